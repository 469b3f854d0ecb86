"""Train the small text-to-image model again, seeded (see deltasvd/t2i/).

  python tools/train_t2i.py base      [--steps 3000] [--out PATH]   # the base, from scratch
  python tools/train_t2i.py finetune  [--steps N] [--base PATH] [--out PATH]  # DreamBooth 'sks'
  python tools/train_t2i.py grid      [--out docs/t2i_samples.png]  # base vs fine-tune samples
  python tools/train_t2i.py judge     [--steps 3000] [--out PATH]   # the subject judge

One thread by default (--threads): the result then depends only on the seed."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log_to(path):
    def log(line):
        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
    return log


def main(argv=None):
    from deltasvd.t2i import weights
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["base", "finetune", "grid", "judge"])
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base", default=weights.BASE)
    p.add_argument("--out")
    p.add_argument("--log")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    log = log_to(a.log)
    if a.what == "base":
        from deltasvd.t2i.train import train_base
        train_base(a.out or weights.BASE, steps=a.steps or 3000, seed=a.seed, log=log)
    elif a.what == "finetune":
        from deltasvd.t2i.dreambooth import finetune
        finetune(a.base, a.out or weights.FINETUNE, steps=a.steps or 600, seed=a.seed, log=log)
    elif a.what == "judge":
        from deltasvd.t2i.judge_train import train_judge
        from deltasvd.t2i.judge import PATH
        train_judge(a.out or PATH, steps=a.steps or 3000, seed=a.seed, log=log)
    else:
        from deltasvd.t2i.grid import save_comparison
        save_comparison(a.base, weights.FINETUNE, a.out or "docs/t2i_samples.png")
    log("done")


if __name__ == "__main__":
    main()
