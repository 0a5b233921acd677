import sys

if sys.argv[1:2] == ["release"]:  # the chart's pre-delete hook (release.py)
    from .release import cli as release_cli

    release_cli(sys.argv[2:])
else:
    from .main import cli

    cli()
