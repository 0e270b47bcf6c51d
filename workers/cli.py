"""``agora-worker``: enroll this machine, run the agent, pause/resume it, show its status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime, timezone
from urllib.parse import urlsplit

from workers import __version__
from workers import config as cfgmod

log = logging.getLogger("agora.worker")

EXIT_ERROR = 1
EXIT_AUTH = 3
EXIT_LOCKED = 4  # another agent runs on this config folder


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def _check_server_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CommandError(f"--server must be an http(s) URL such as https://agora.example.org, not {url!r}")
    return url.rstrip("/")


# --- enroll ---------------------------------------------------------------------------------------


def cmd_enroll(args) -> int:
    from workers.bench import run_benchmark
    from workers.client import Client, NetworkError, ProtocolError
    from workers.hardware import choose_device, detect_hardware

    path = cfgmod.resolve_config_path(args.config)
    if path.exists() and not args.force:
        try:
            existing = cfgmod.load_config(path)
            what = f"as worker {existing.worker_id} on {existing.server}"
        except cfgmod.ConfigError:
            what = "(unreadable config)"
        raise CommandError(f"this machine is already enrolled {what}; config {path}. "
                           "Use --force to enroll again (the old worker token is forgotten)")
    holder = cfgmod.lock_holder(path)
    if holder is not None:
        raise CommandError(f"an agent (pid {holder or '?'}) is running on {path.parent}; stop it before enrolling "
                           "again", EXIT_LOCKED)
    server = _check_server_url(args.server)
    name = (args.name or _default_name()).strip()[:100]

    hardware = detect_hardware()
    gpus = ", ".join(f"{g['name']} ({g['memory_mb']} MiB)" for g in hardware["gpus"]) or "none"
    print(f"hardware: {hardware['cpu_count']} CPUs, {hardware['memory_mb']} MiB RAM, GPUs: {gpus}, "
          f"torch {hardware['torch']}, CUDA {hardware['cuda'] or '-'}")
    device = choose_device(gpus=None, allow_cpu=True)
    print(f"benchmarking {device} (a few seconds) ...", flush=True)
    bench = run_benchmark(device)
    print(f"benchmark: {bench['tflops']:.3f} TFLOPS (fp32 matmul), {bench['mem_gbps']:.1f} GB/s memory")

    with Client(server) as client:
        try:
            answer = client.enroll(enrollment_token=args.token, name=name, hardware=hardware,
                                   benchmark={"tflops": bench["tflops"], "mem_gbps": bench["mem_gbps"]},
                                   agent_version=__version__)
        except NetworkError as exc:
            raise CommandError(f"cannot reach the server at {server}: {exc.__cause__ or exc}") from exc
        except ProtocolError as exc:
            raise CommandError(f"the server refused the enrollment: {exc.detail or exc.error} ({exc.error}, "
                               f"HTTP {exc.status})") from exc
    if not isinstance(answer.get("worker_id"), int) or not answer.get("worker_token"):
        raise CommandError(f"the server's answer lacks worker_id/worker_token: {sorted(answer)}")
    config = cfgmod.WorkerConfig(server=server, worker_id=answer["worker_id"], worker_token=answer["worker_token"],
                                 name=name, agent_version=__version__,
                                 enrolled_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), path=path)
    cfgmod.save_config(config)
    print(f"enrolled as worker {config.worker_id} ({name}) on {server}")
    print(f"config saved to {path} (readable only by you; it holds the worker token)")
    print("start the agent with: agora-worker run" + ("" if hardware["gpus"] else " --allow-cpu"))
    return 0


def _default_name() -> str:
    import socket

    return socket.gethostname() or "worker"


# --- run ------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    config = cfgmod.load_config(args.config)
    lock = cfgmod.AgentLock(config.path)
    try:
        lock.acquire()
    except cfgmod.AgentLocked as exc:
        raise CommandError(str(exc), EXIT_LOCKED) from exc
    except OSError as exc:
        raise CommandError(f"cannot lock {lock.path}: {exc.strerror or exc}") from exc
    try:
        return _run_locked(args, config, lock)
    finally:
        lock.release()


def _run_locked(args, config: cfgmod.WorkerConfig, lock: cfgmod.AgentLock) -> int:
    from workers.agent import Agent, AgentOptions
    from workers.client import Client
    from workers.hardware import DeviceError, busy_reason, choose_device, parse_gpu_list
    from workers.runner import TaskRunner

    if not cfgmod.config_is_private(config.path):
        log.warning("%s is readable by other users; it holds the worker token (chmod 600 it)", config.path)
    try:
        device = choose_device(gpus=parse_gpu_list(args.gpus), allow_cpu=args.allow_cpu)
    except DeviceError as exc:
        raise CommandError(str(exc)) from exc
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
        log.info("training on %s (%s)", device, torch.cuda.get_device_name(device))
    else:
        log.info("training on the CPU")
    if args.max_mbps is not None and not (0 < args.max_mbps <= 1e6):
        raise CommandError("--max-mbps must be a number of megabits per second above 0")
    client = Client(config.server, config.worker_token, max_mbps=args.max_mbps)
    if args.max_mbps:
        log.info("link capped at %g Mbit/s in each direction", args.max_mbps)
    if args.data_root and not os.path.isdir(args.data_root):
        raise CommandError(f"--data-root {args.data_root} is not a folder")
    if args.max_dataset_mb < 1:
        raise CommandError("--max-dataset-mb must be at least 1")
    runner = TaskRunner(client=client, cache_dir=config.cache_path, device=device, data_root=args.data_root or None,
                        max_dataset_bytes=args.max_dataset_mb * 1024 * 1024)
    options = AgentOptions(once=args.once, finish=args.finish, idle_only=args.idle_only)
    idle_check = (lambda: busy_reason(cpu_threshold=args.idle_cpu_percent)) if args.idle_only else None
    agent = Agent(config, runner=runner, client=client, options=options, idle_check=idle_check, lock=lock)
    agent.install_signal_handlers()
    code = agent.run()
    if code != 0:
        raise CommandError(agent.stop_message, code)
    log.info("stopped (%d task%s completed)", agent.tasks_done, "" if agent.tasks_done == 1 else "s")
    return 0


# --- status, pause, resume ------------------------------------------------------------------------


def cmd_status(args) -> int:
    from workers.client import AuthError, Client, ClientError

    config = cfgmod.load_config(args.config)
    paused = cfgmod.is_paused(config.path)
    state = cfgmod.state_load(config.path)
    try:
        holder = cfgmod.lock_holder(config.path)
    except OSError as exc:
        raise CommandError(f"cannot tell whether an agent is running: {exc}") from exc
    running = holder is not None
    print(f"worker:     {config.name or '-'} (id {config.worker_id})")
    print(f"server:     {config.server}")
    print(f"config:     {config.path}")
    print("agent:      " + (f"running (pid {holder or '?'})" if running else "not running"))
    print(f"paused:     {'yes (agora-worker resume to continue)' if paused else 'no'}")
    if state.get("task_id"):
        if running:
            print(f"local task: {state['task_id']} (started {state.get('started_at', '?')})")
        else:
            print(f"local task: {state['task_id']} was interrupted (started {state.get('started_at', '?')}); "
                  "the agent reports it as failed when it starts")
    try:
        manifest = cfgmod.pending_manifest(config.path)
    except cfgmod.PendingCorrupt as exc:
        print(f"result:     unreadable, discarded when the agent starts ({exc})")
        manifest = None
    if manifest is not None:
        when = "the running agent is delivering it" if running else "delivered when the agent starts"
        print(f"result:     task {manifest['task_id']} (run {manifest.get('run_id')}, round {manifest.get('round')}), "
              f"{manifest.get('update_bytes', '?')} bytes, deadline {manifest.get('deadline') or 'unknown'}: "
              f"waiting to be delivered; {when}")
    with Client(config.server, config.worker_token, timeout=15) as client:
        try:
            me = client.me()
        except AuthError as exc:
            raise CommandError(exc.explain(), EXIT_AUTH) from exc
        except ClientError as exc:
            raise CommandError(f"cannot get the live state from {config.server}: {exc}") from exc
    live = me.get("live_state", "?")
    if running or live in ("offline", "revoked", "suspended"):
        print(f"state:      {live}" + (f" (task {me['task_id']}, {100 * me['progress']:.0f}%)"
                                        if me.get("task_id") and me.get("progress") is not None else ""))
    else:  # the server's presence lags a dead agent by its timeout; this machine knows better
        print(f"state:      not running here (the server still shows it {live} until its presence times out)")
    print(f"status:     {me.get('status', '?')}" + (f" ({me['status_reason']})" if me.get("status_reason") else ""))
    print(f"reliability: {float(me.get('reliability', 0)):.3f} ({me.get('tasks_valid', 0)} valid, "
          f"{me.get('tasks_invalid', 0)} invalid)")
    print(f"credits:    {me.get('credits', 0)}")
    print(f"last seen:  {me.get('last_seen') or 'never'}")
    return 0


def cmd_pause(args) -> int:
    path = cfgmod.resolve_config_path(args.config)
    was = cfgmod.set_paused(path, True)
    print("already paused" if was else f"paused: a running agent stops claiming work and halts its task "
                                        f"(pause file {cfgmod.pause_path(path)})")
    return 0


def cmd_resume(args) -> int:
    path = cfgmod.resolve_config_path(args.config)
    was = cfgmod.set_paused(path, False)
    print("resumed" if was else "not paused")
    return 0


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help=f"config file (default: ${cfgmod.CONFIG_ENV} or ~/.config/agora/worker.json)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(prog="agora-worker",
                                     description="Agora's volunteer agent: lend this machine's GPUs to "
                                                 "community-governed DiLoCo training runs.")
    parser.add_argument("--version", action="version", version=f"agora-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", parents=[common], help="register this machine with an enrollment token")
    p.add_argument("--server", required=True, help="the Agora server's URL, e.g. https://agora.example.org")
    p.add_argument("--token", required=True, help="enrollment token from the server's 'Add a worker' page")
    p.add_argument("--name", help="a name for this worker (default: the host name)")
    p.add_argument("--force", action="store_true", help="replace an existing config")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("run", parents=[common], help="heartbeat, claim tasks and train them until stopped")
    p.add_argument("--gpus", metavar="0,1", help="CUDA GPUs the agent may use; a task runs on the first (default: all)")
    p.add_argument("--allow-cpu", action="store_true", help="train on the CPU when there is no GPU")
    p.add_argument("--idle-only", action="store_true",
                   help="claim work only while the machine is idle (low CPU load, no other GPU processes)")
    p.add_argument("--idle-cpu-percent", type=float, default=30.0, metavar="P",
                   help="CPU use (percent) under which the machine counts as idle (default 30)")
    p.add_argument("--finish", action="store_true", help="stop after completing one task")
    p.add_argument("--once", action="store_true", help="claim once: run the task if there is one, then exit")
    p.add_argument("--data-root", metavar="DIR", default=os.environ.get("AGORA_WORKER_DATA_ROOT") or None,
                   help="folder that file: dataset sources must be in (env AGORA_WORKER_DATA_ROOT; default: none, "
                        "so tasks with file: sources are refused)")
    p.add_argument("--max-dataset-mb", type=int, metavar="MB",
                   default=int(os.environ.get("AGORA_WORKER_MAX_DATASET_MB") or 256),
                   help="largest dataset this agent reads or downloads, in MiB (env AGORA_WORKER_MAX_DATASET_MB; "
                        "default 256)")
    p.add_argument("--max-mbps", type=float, metavar="X",
                   default=os.environ.get("AGORA_WORKER_MAX_MBPS") or None,
                   help="cap uploads and downloads at X megabits per second each (a token bucket; env "
                        "AGORA_WORKER_MAX_MBPS; default: no cap)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", parents=[common], help="show this worker's record and live state")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("pause", parents=[common], help="pause a running agent (it keeps heartbeating)")
    p.set_defaults(func=cmd_pause)
    p = sub.add_parser("resume", parents=[common], help="resume a paused agent")
    p.set_defaults(func=cmd_resume)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except cfgmod.ConfigError as exc:
        print(f"agora-worker: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except CommandError as exc:
        print(f"agora-worker: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("agora-worker: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
