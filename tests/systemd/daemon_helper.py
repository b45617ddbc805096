"""A stand-in for `authd serve --daemon`: run_daemon with a tiny serve that binds a Unix socket.

Usage: daemon_helper.py MODE --pidfile P --socket S --workdir D [--log L] [--timeout T]
MODE is how start-up goes: `serve` (ready, then wait for SIGTERM; SIGHUP reopens the log),
`bad-config` (reports an error), `crash` (raises before ready), `no-ready` (returns 3),
`die` (killed before ready), `hang` (never ready).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

from authd.daemonize import Ready, run_daemon
from authd.logs import redirect_std


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "bad-config", "crash", "no-ready", "die", "hang"])
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    args.socket = args.socket.absolute()  # serve runs after the chdir to --workdir

    def serve(ready: Ready) -> int:
        print(f"starting in mode {args.mode}", flush=True)
        if args.mode == "bad-config":
            ready("bad config: daemon.socket: expected a path")
            return 1
        if args.mode == "crash":
            raise RuntimeError("boom during start-up")
        if args.mode == "no-ready":
            return 3
        if args.mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if args.mode == "hang":
            while True:
                time.sleep(60)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(args.socket))
        listener.listen()
        print("serving", flush=True)
        ready(None)
        while signal.sigwait({signal.SIGTERM, signal.SIGHUP}) == signal.SIGHUP:
            if args.log is not None:
                redirect_std(args.log)
            print("log reopened", flush=True)
        listener.close()
        args.socket.unlink()
        print("stopped", flush=True)
        return 0

    return run_daemon(
        serve, pidfile=args.pidfile, log_file=args.log, working_directory=args.workdir, start_timeout=args.timeout
    )


if __name__ == "__main__":
    sys.exit(main())
