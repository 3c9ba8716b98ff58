"""Our trainer's step vs an original-style PyTorch SIFT step, same model and batch shapes.

Run: ``python -m bench.vs_torch --torch_python /path/to/torch-venv/bin/python``

torch is never a dependency of this project: the PyTorch side runs in a separate interpreter
(a venv with ``torch`` and ``transformers``, e.g. ``python3 -m venv /tmp/torchvenv &&
/tmp/torchvenv/bin/pip install torch==2.13.0 transformers safetensors``), given by path. It
builds HF's ``BertForSequenceClassification`` from the packaged MiniLM directory and times, in
train mode (dropout on) on random token batches of the same shape, (a) full fine-tuning with
``torch.optim.AdamW`` and (b) SIFT as the original code does it: the targeted weights keep
``requires_grad``, a tensor hook on each moves ``grad[idx]`` into a sparse parameter's gradient
and drops the dense one, AdamW steps the sparse parameters and the classifier, and the
increments are added into the weights (one step late in the original; here in the same step,
which costs the same). Our side is ``bench.train_step``'s measurement of the trainer's own step
in this process. Without ``--torch_python`` it prints how to provide one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import textwrap

TORCH_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from transformers import BertForSequenceClassification
    model_dir, batch, seq, steps, rate, mode = sys.argv[1:7]
    batch, seq, steps, rate = int(batch), int(seq), int(steps), float(rate)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.train()
    ids = torch.randint(1000, 20000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 2, (batch,))
    targets = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense")
    if mode == "full":
        params = list(model.parameters())
    else:
        params, sparse = [], []
        for name, p in model.named_parameters():
            if any(t in name for t in targets):
                k = min(int(rate * p.numel()) + 1, p.numel())
                idx = torch.randperm(p.numel())[:k]  # selection happened before timing
                sp = torch.nn.Parameter(p.new_zeros(k))
                sparse.append((p, sp, idx))
                def hook(g, sp=sp, idx=idx):
                    sp.grad = g.reshape(-1)[idx].clone()
                    return torch.zeros_like(g)
                p.register_hook(hook)
                p.requires_grad_(True)
                params.append(sp)
            elif name.startswith("classifier"):
                p.requires_grad_(True)
                params.append(p)
            else:
                p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode == "sift":
            with torch.no_grad():
                for p, sp, idx in sparse:
                    p.view(-1).index_add_(0, idx, sp.data)
                    sp.data.zero_()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"s_per_step": statistics.median(times),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))
    """
)


def torch_step(python: str, model_dir: str, batch: int, seq: int, steps: int, rate, mode) -> dict:
    """Median seconds per step of the PyTorch side (``mode`` ``"full"`` or ``"sift"``)."""
    out = subprocess.run(
        [python, "-c", TORCH_SCRIPT, model_dir, str(batch), str(seq), str(steps), str(rate), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--torch_python", default=None, help="python of a venv with torch")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rate", type=float, default=0.008)
    args = ap.parse_args(argv)
    if not args.torch_python:
        print(
            "bench.vs_torch needs a separate interpreter with torch (never a dependency here):\n"
            "  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 "
            "transformers safetensors\n"
            "  python -m bench.vs_torch --torch_python /tmp/torchvenv/bin/python"
        )
        return None
    from bench import train_step
    from train.data import assets

    model_dir = str(assets.minilm_dir())
    ours = train_step.measure_trainer(args.batch, args.seq, args.steps, args.rate)
    theirs = {
        m: torch_step(args.torch_python, model_dir, args.batch, args.seq, args.steps, args.rate, m)
        for m in ("full", "sift")
    }
    print(
        f"MiniLM-L6, batch {args.batch} x seq {args.seq}, dropout on, SIFT rate {args.rate}; "
        f"torch {theirs['sift']['torch']} ({theirs['sift']['threads']} threads)"
    )
    print(f"{'step':34s} {'s/step':>8s} {'vs torch SIFT':>14s} {'vs own full FT':>15s}")
    t_sift = theirs["sift"]["s_per_step"]
    rows = {
        "PyTorch full FT (AdamW)": (theirs["full"]["s_per_step"], theirs["full"]["s_per_step"]),
        "PyTorch SIFT (original-style)": (t_sift, theirs["full"]["s_per_step"]),
        "ours full FT (trainer step)": (ours["full"], ours["full"]),
        "ours SIFT (trainer step)": (ours["sift"], ours["full"]),
    }
    for name, (t, own_full) in rows.items():
        print(f"{name:34s} {t:8.3f} {t / t_sift:13.2f}x {own_full / t:14.2f}x")
    return {"ours": ours, "torch": theirs}


if __name__ == "__main__":
    main()
