"""The main job: train a small GPT of nanoblock Blocks, and the same GPT of
reference (plain PyTorch) Blocks side by side, on a task it can be graded on.

    python -m nanoblock.demo            # about a minute on 2 CPU cores
    python -m nanoblock.demo --steps 600 --device cuda

The task is sorting: the model reads 12 random digits and a separator and
must write the digits in ascending order. Data are generated (nothing is
downloaded); the loss counts only the sorted half. Both models start from the
same weights and see the same batches, so their loss curves must agree; the
demo prints both, the speed of each, and how many held-out sequences each
sorts exactly (greedy decoding).
"""
import argparse
import copy
import sys
import time

import torch

from .model import GPT, GPTConfig
from .reference import ReferenceGPT

DIGITS = 10
SEP = DIGITS  # the separator token
N_DIGITS = 12


def sorting_batch(batch_size, generator, device):
    """idx, targets [batch, 2 N_DIGITS]: digits, separator, sorted digits;
    targets are -1 (ignored) where the next token is not part of the answer."""
    digits = torch.randint(0, DIGITS, (batch_size, N_DIGITS), generator=generator)
    sep = torch.full((batch_size, 1), SEP)
    seq = torch.cat([digits, sep, digits.sort(dim=1).values], dim=1)  # [B, 2N + 1]
    idx, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    targets[:, :N_DIGITS] = -1
    return idx.to(device), targets.to(device)


class ProgressBar:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total, label, width=30):
        self.total, self.label, self.width = total, label, width
        self.start = time.perf_counter()

    def update(self, done, loss):
        filled = int(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r  {self.label:10s} [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{done}/{self.total}  loss {loss:.3f}  {elapsed:5.1f}s")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(model, steps, batch_size, lr, seed, device, label):
    """Trains on fresh batches (the same ones for the same seed); returns the
    loss at every step and the seconds spent."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = ProgressBar(steps, label)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        idx, targets = sorting_batch(batch_size, g, device)
        # linear warm-up over the first 10% of steps, then constant
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == steps:
            bar.update(step + 1, losses[-1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return losses, time.perf_counter() - start


@torch.no_grad()
def sorted_exactly(model, n, seed, device):
    """Fraction of n held-out sequences sorted exactly, and of digits right."""
    model.eval()
    idx, _ = sorting_batch(n, torch.Generator().manual_seed(seed), device)
    prompt = idx[:, :N_DIGITS + 1]
    out = model.generate(prompt, N_DIGITS, temperature=0)[:, N_DIGITS + 1:]
    want = prompt[:, :N_DIGITS].sort(dim=1).values
    model.train()
    return (out == want).all(dim=1).float().mean().item(), (out == want).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=96)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=500)
    args = p.parse_args(argv)
    device = torch.device(args.device)

    config = GPTConfig(block_size=2 * N_DIGITS, vocab_size=DIGITS + 1, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=0.0, bias=True)
    torch.manual_seed(args.seed)
    nb_model = GPT(config).to(device)
    ref_model = ReferenceGPT(config).to(device)
    ref_model.load_state_dict(copy.deepcopy(nb_model.state_dict()))  # same start
    print(f"nanoblock demo: sorting {N_DIGITS} digits, GPT of {config.n_layer} Blocks "
          f"(n_embd {config.n_embd}, {config.n_head} heads, "
          f"{nb_model.get_num_params() / 1e3:.0f}K parameters), {args.steps} steps of "
          f"{args.batch_size} sequences, on {device}")

    nb_losses, nb_time = train(nb_model, args.steps, args.batch_size, args.lr, args.seed,
                               device, "nanoblock")
    ref_losses, ref_time = train(ref_model, args.steps, args.batch_size, args.lr, args.seed,
                                 device, "reference")

    # Step by step the two runs agree to float32 rounding at first; training
    # amplifies those differences, so later single steps drift apart while
    # the curves (means over windows of steps) stay together.
    window = max(1, args.steps // 10)
    print(f"\n  steps        nanoblock loss   reference loss   (mean over {window} steps)")
    worst = 0.0
    for start in range(0, args.steps, window):
        nb_mean = sum(nb_losses[start:start + window]) / len(nb_losses[start:start + window])
        ref_mean = sum(ref_losses[start:start + window]) / len(ref_losses[start:start + window])
        worst = max(worst, abs(nb_mean - ref_mean) / ref_mean)
        print(f"  {start + 1:4d}-{min(start + window, args.steps):<4d}   {nb_mean:14.4f}   "
              f"{ref_mean:14.4f}")
    first = next((i for i, (a, b) in enumerate(zip(nb_losses, ref_losses))
                  if abs(a - b) > 1e-4 * abs(b)), None)
    print(f"  identical to 1e-4 for the first {args.steps if first is None else first} steps; "
          f"window means within {100 * worst:.1f}% of each other")

    tokens = args.steps * args.batch_size * 2 * N_DIGITS
    print(f"\n  training time  nanoblock {nb_time:6.1f} s ({tokens / nb_time:8.0f} tokens/s)   "
          f"reference {ref_time:6.1f} s ({tokens / ref_time:8.0f} tokens/s)   "
          f"speed-up {ref_time / nb_time:.2f}x")
    nb_exact, nb_digits = sorted_exactly(nb_model, args.eval_size, args.seed + 1, device)
    ref_exact, ref_digits = sorted_exactly(ref_model, args.eval_size, args.seed + 1, device)
    print(f"  held-out sequences sorted exactly: nanoblock {100 * nb_exact:5.1f}% "
          f"(digits right {100 * nb_digits:5.1f}%)   reference {100 * ref_exact:5.1f}% "
          f"(digits right {100 * ref_digits:5.1f}%)")

    sample, _ = sorting_batch(1, torch.Generator().manual_seed(args.seed + 2), device)
    prompt = sample[:, :N_DIGITS + 1]
    answer = nb_model.eval().generate(prompt, N_DIGITS, temperature=0)[0, N_DIGITS + 1:]
    print(f"  sample: {' '.join(map(str, prompt[0, :N_DIGITS].tolist()))}  ->  "
          f"{' '.join(map(str, answer.tolist()))}")
    return dict(nanoblock_losses=nb_losses, reference_losses=ref_losses, nanoblock_time=nb_time,
                reference_time=ref_time, nanoblock_exact=nb_exact, reference_exact=ref_exact)


if __name__ == "__main__":
    main()
