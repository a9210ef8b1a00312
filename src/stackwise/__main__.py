import sys


def _run() -> int:
    # Ctrl-C in the first moments (while the command's modules import) ends with one line and
    # exit 130, like a Ctrl-C later on: nothing outside this guard imports more than `sys`.
    try:
        from stackwise.cli import main

        return main()
    except KeyboardInterrupt:
        print("stackwise: interrupted", file=sys.stderr)
        return 130


sys.exit(_run())
