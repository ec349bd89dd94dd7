"""python -m finetune [recipe=NAME] [key=value ...] [--cfg job]"""

from __future__ import annotations

import sys

USAGE = """usage: python -m finetune [recipe=NAME] [key=value ...] [--cfg job]

  recipe=NAME   a file in recipes/ (default: tiny, which runs on a laptop CPU with no downloads)
  key=value     override any config key, e.g. train.max_steps=400 lora.r=8 data.train=my.jsonl
  --cfg job     print the resolved config and exit
"""


def main(argv: list[str] | None = None) -> int:
    from finetune.errors import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    show_cfg = False
    if "--cfg" in argv:
        i = argv.index("--cfg")
        if argv[i + 1 : i + 2] not in (["job"], ["all"]):
            print("error: --cfg takes 'job'", file=sys.stderr)
            return 2
        del argv[i : i + 2]
        show_cfg = True
    def body():
        from finetune.config import compose

        cfg = compose(argv)
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        from finetune.run import run

        run(cfg)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
