"""EleutherAI's lm-evaluation-harness model "nanoflant5" (pip install 'nanoflant5[eval]'). Importing this module
registers it:

    import lm_eval, nanoflant5.harness
    lm_eval.simple_evaluate(model="nanoflant5", model_args="pretrained=google/flan-t5-large,dtype=float32,"
                            "batch_size=16,max_length=512,device=cpu", tasks=["mmlu"], num_fewshot=5)

Arguments as lm-eval's `hf` model names them (peft=DIR: a LoRA adapter, merged into the weights; see lora.py).
Every request is answered as lm-eval's `hf` model with backend=seq2seq answers it (lm_eval/models/huggingface.py),
so scores can be compared one to one:
- loglikelihood(context, continuation): the context's tokens (ending in </s>) go to the encoder, truncated from the
  left to max_length; the continuation's tokens (without </s>) are the decoder's labels; the answer is the sum of
  their log-probabilities (float32, or the model's dtype if wider) and whether each is the argmax. Requests are
  batched longest first, as lm-eval sorts them, so that a question's continuations (MMLU's four letters) land in
  one batch, where their context is encoded once;
- loglikelihood_rolling(text): lm-eval's rolling windows of max_length tokens, each scored as above with </s> as its
  encoder input, summed;
- generate_until(context, gen_kwargs): the context truncated from the left to max_length, decoded greedily (or as
  gen_kwargs say) for up to (the batch's longest context) + max_gen_toks - 1 tokens, as the hf model's max_length
  allows, ending early where its stopping criteria end it (decode_until), then cut at each stop string in turn.
  Batches are formed as lm-eval forms them (its Collator), since both depend on the batch.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

try:
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
except ImportError as e:
    raise ImportError(f"nanoflant5.harness needs lm-evaluation-harness: pip install 'nanoflant5[eval]' ({e})") from e
from tqdm import tqdm

from .load import resolve
from .model import T5
from .speed import encode
from .tokenizer import TOKENIZER_FILES, Tokenizer, pad_rows

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, when neither the config nor the tokenizer says


@register_model("nanoflant5")
class NanoFlanT5(TemplateLM):
    backend = "seq2seq"

    def __init__(self, pretrained: str = "google/flan-t5-base", dtype: str = "float32", batch_size: int | str = 16,
                 max_length: int | None = None, device: str = "cpu", max_gen_toks: int = 256,
                 quantize: str | None = None, peft: str | None = None, **ignored):
        super().__init__()
        if str(dtype) == "auto":
            dtype = "float32"
        self.model = T5.from_pretrained(pretrained, dtype=getattr(torch, str(dtype)), device=device,
                                        quantize=quantize, adapter=peft)  # peft: a LoRA adapter, as hf names it
        tokenizer_folder = resolve(pretrained, TOKENIZER_FILES)
        self.tokenizer = Tokenizer(tokenizer_folder)
        self._device = torch.device(device)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else tokenizer_max_length(tokenizer_folder)
        self._max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_token_id  # T5 has no BOS: lm-eval's hf model uses </s>

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """Token ids, ending in </s> unless add_special_tokens=False (or the text already starts with </s>)."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith("</s>")
        ids = self.tokenizer.encode_ids(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """[(key, context ids, continuation ids)] -> [(sum of log-probabilities, greedy)], in the requests' order."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            contexts = [tuple(ctx[-self.max_length:]) for _, ctx, _ in chunk]
            unique = list(dict.fromkeys(contexts))  # a question's continuations share one encoder pass
            rows = torch.tensor([unique.index(c) for c in contexts], device=self.device)
            ids, mask = pad_rows(unique, self.tokenizer.pad_token_id, self.device)
            labels, _ = pad_rows([cont[-self.max_length:] for _, _, cont in chunk], self.tokenizer.pad_token_id,
                                 self.device)
            with torch.inference_mode():
                encoded = encode(self.model, ids, mask)
                logits = self.model.decode(self.model.shift_right(labels), encoded[rows], mask[rows])
                log_probs = F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
            for (key, _, cont), row in zip(chunk, log_probs):
                row = row[:len(cont)]
                target = torch.tensor(cont, device=row.device)
                answer = (float(row.gather(1, target[:, None]).sum()), bool((row.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="Running rolling requests"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            scores = self._loglikelihood_tokens([(None,) + w for w in windows], disable_tqdm=True)
            totals.append(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            rows = [self.tok_encode(c)[-self.max_length:] for c in contexts]
            ids, mask = pad_rows(rows, self.tokenizer.pad_token_id, self.device)
            # the hf model's max_length: the padded contexts' width plus max_gen_toks, the start token included
            settings = generation_settings(kwargs, ids.shape[1] + max_gen_toks - 1)
            for row, context in zip(self.decode_until(ids, mask, settings, until), contexts):
                text = postprocess_generated_text(generation=self.tok_decode(row), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def decode_until(self, ids, mask, settings: dict, until: list[str]) -> list[list[int]]:
        """The generated tokens of each row, decoding until lm-eval's hf model would stop (greedy or sampled: one
        token a step, stream(); beam search decodes to the end). Its stopping criteria (stop_sequences_criteria in
        lm_eval/models/utils_hf.py) hold one tracker per stop string: string s marks row i done once s shows in the
        decoded (special tokens kept) last len(tokens of s) + 2 tokens of the row's decoder sequence past its first
        `input width` positions, and decoding ends once one string has marked every row (or every row has ended,
        or at the limit). For seq2seq the decoder sequence is the start token and the generated tokens, so a stop
        string ends decoding only after the input's width of tokens; the text is cut at the stop strings after."""
        if settings.get("num_beams", 1) > 1:
            return self.model.generate(ids, mask, **settings).tolist()
        width, B = ids.shape[1], ids.shape[0]
        lookback = {s: len(self.tok_encode(s, add_special_tokens=False)) + 2 for s in until}
        done = {s: [False] * B for s in until}
        rows = [[self.model.config.decoder_start_token_id] for _ in range(B)]
        for tokens in self.model.stream(ids, mask, **settings):
            for row, token in zip(rows, tokens.tolist()):
                row.append(token)  # (padding once a row has ended, as transformers appends)
            for s, marks in done.items():
                for i, row in enumerate(rows):
                    if not marks[i]:
                        window = row[width:][-lookback[s]:]
                        marks[i] = s in (self.tok_decode(window, skip_special_tokens=False) if window else "")
            if any(all(marks) for marks in done.values()):
                break
        return [row[1:] for row in rows]


def generation_settings(kwargs: dict, max_new_tokens: int) -> dict:
    """lm-eval's generation kwargs as generate() arguments: temperature 0 (or none) is greedy decoding."""
    kwargs = dict(kwargs)
    kwargs.pop("max_length", None)
    temperature = kwargs.pop("temperature", 0.0)
    do_sample = kwargs.pop("do_sample", None)
    if do_sample is None:
        do_sample = bool(temperature)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=bool(do_sample))
    if do_sample and temperature:
        settings["temperature"] = float(temperature)
    return {**{k: v for k, v in kwargs.items() if v is not None}, **settings}


def tokenizer_max_length(folder) -> int:
    """The tokenizer's model_max_length (FLAN-T5's files say 512), as lm-eval's hf model reads it, else 2048."""
    try:
        with open(folder / "tokenizer_config.json") as f:
            n = int(json.load(f).get("model_max_length", 0))
    except (OSError, ValueError, TypeError):
        n = 0
    return n if 0 < n < 1e9 else DEFAULT_MAX_LENGTH
