"""`dstk env`: versions, machine, and what is built in; paste it into bug reports."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env", help="print versions, the machine and the built-in presets",
        description="Print the versions of dstk and the libraries it trains with, the machine (platform, CPUs, "
        "accelerator), and the built-in recipes, model presets and DeepSpeed templates: paste it into bug reports.")
    parser.set_defaults(run=run)


def run(args) -> int:
    import os
    import platform

    from toolkit.models.presets import PRESETS
    from toolkit.plan.ds_config import template_names
    from toolkit.plan.lineage import versions
    from toolkit.recipe import builtin_recipes

    for name, value in versions().items():
        print(f"{name:<14} {value}")
    print(f"{'platform':<14} {platform.platform()}  cpus={os.cpu_count()}")
    try:
        from toolkit.training.runtime import accelerator

        print(f"{'accelerator':<14} {accelerator()}")
    except ImportError:
        pass
    print(f"{'recipes':<14} {', '.join(builtin_recipes())}")
    print(f"{'presets':<14} {', '.join(PRESETS)}")
    print(f"{'ds_configs':<14} {', '.join(template_names())}")
    return 0
