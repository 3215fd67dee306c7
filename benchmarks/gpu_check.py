"""GPU checks for benchmarks/gpu.sh: nanoflant5 against transformers on the accelerator, the FlexAttention path
against SDPA (forward and backward), and low-precision generation against float32. Prints one PASS/FAIL line per
check and exits non-zero on a failure. `--device cpu` runs the same checks on CPU (FlexAttention backward skipped:
PyTorch has none on CPU)."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_checkpoint, random_batch  # noqa: E402

from nanoflant5 import T5  # noqa: E402

FAILED = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    device = torch.device(p.parse_args().device)
    from transformers import T5ForConditionalGeneration

    folder = Path(tempfile.mkdtemp())
    make_checkpoint(folder, "gated-gelu-untied", seed=1, vocab_size=32128, d_model=256, d_kv=32, d_ff=512,
                    num_layers=4, num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    ids, mask = (t.to(device) for t in random_batch(32000, [30, 7, 200, 64], seed=2))
    dec = torch.randint(0, 32128, (4, 40), device=device)

    ref = T5ForConditionalGeneration.from_pretrained(folder).to(device).eval()
    ours = T5.from_pretrained(folder, device=device)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for backend in ("sdpa", "flex"):
            got = ours.set_attention_backend(backend)(ids, mask, dec)
            err = ((got - want).abs().max() / want.abs().max()).item()
            check(f"fp32 logits vs transformers ({backend})", err < 1e-4, f"rel err {err:.1e}")
        ours.set_attention_backend("auto")
        for kw in (dict(max_new_tokens=32), dict(max_new_tokens=32, num_beams=4, num_return_sequences=2)):
            a = ours.generate(ids, mask, **kw)
            b = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
            same = sum(torch.equal(x, y) for x, y in zip(a, b)) if a.shape == b.shape else 0
            check(f"fp32 generate vs transformers {kw}", same >= len(b) - 1, f"{same}/{len(b)} rows equal")
        exact, exact_logits = ours.generate(ids, mask, max_new_tokens=32), ours(ids, mask, dec)
        t0 = time.perf_counter()
        compiled = ours.generate(ids, mask, max_new_tokens=32, compile=True)
        check("generate(compile=True) vs eager", torch.equal(compiled, exact),
              f"(first call, with compilation: {time.perf_counter() - t0:.0f} s)")
        for dtype, tol in ((torch.bfloat16, 0.25), (torch.float16, 0.05)):  # random weights amplify rounding
            low = T5.from_pretrained(folder, dtype=dtype, device=device)
            logits = low(ids, mask, dec).float()
            err = ((logits - exact_logits).abs().max() / exact_logits.abs().max()).item()
            rows = low.generate(ids, mask, max_new_tokens=32)
            same = sum(torch.equal(x[:len(y)], y[:len(x)]) for x, y in zip(rows, exact))
            check(f"{dtype} close to fp32", bool(torch.isfinite(logits).all()) and err < tol,
                  f"logits rel err {err:.1e}; {same}/{len(exact)} generated rows equal to fp32's (random weights)")

    if device.type == "cuda":  # FlexAttention backward (training) against SDPA
        grads = {}
        for backend in ("sdpa", "flex"):
            model = T5.from_pretrained(folder, device=device).train().set_attention_backend(backend)
            model(ids, mask, dec).float().logsumexp(-1).mean().backward()
            grads[backend] = model.encoder.relative_bias.embedding.weight.grad
        err = ((grads["flex"] - grads["sdpa"]).abs().max() / grads["sdpa"].abs().max()).item()
        check("flex backward vs sdpa (relative bias grad)", err < 1e-3, f"rel err {err:.1e}")
    print("ALL PASSED" if not FAILED else f"FAILED: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
