"""python -m eval.harness [lm-eval arguments]: lm-evaluation-harness's own command line, with the `diffusiongemma`
model registered (the harness discovers only its built-in models).

    python -m eval.harness --model diffusiongemma --model_args adapter=outputs/<run>/adapter \
        --tasks gsm8k --apply_chat_template --batch_size 4 --limit 50
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import eval.lm_eval_model  # noqa: F401 (registers the model)
    except ImportError as e:
        print(f"error: lm-evaluation-harness is not installed ({e}): pip install -e \".[lm-eval]\"", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
