"""The poisonwatch command line: serve, demo, db, incidents and token.

Results go to standard output; logs go to standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from monitor.config import CONFIG_FILE_VARIABLE, MULTIPROCESS_DIR_VARIABLE, Config, load_config
from monitor.database import open_migrated
from monitor.errors import PoisonwatchError
from storage.models import IncidentState

logger = logging.getLogger("monitor")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "httpx", "jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # APScheduler warns at every interval that a busy job skipped a run
    # (max_instances=1 is deliberate); real job errors are logged by our listener.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # Unwind through the same path as Ctrl-C, so the scheduler and server stop cleanly.
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # Checked before the daemon opens its engine, which would create a missing SQLite file.
    open_migrated(config.database.url).dispose()
    if args.workers > 1:
        return _serve_workers(config, args)

    from monitor.api import freeze_startup_objects
    from monitor.daemon import Daemon

    daemon = Daemon(config)
    try:
        daemon.start()
    except BaseException:
        daemon.stop()
        raise
    # A process-wide setting, so only the serve entry point makes it, not the Daemon class.
    freeze_startup_objects()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    logger.info("serving on %s", daemon.base_url)
    try:
        daemon.wait()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        daemon.stop()
    return 0


def _serve_workers(config: Config, args: argparse.Namespace) -> int:
    """Serve the API from ``args.workers`` uvicorn worker processes and run the scheduler in this one.

    The workers are ``monitor.asgi`` applications. Metrics of every process,
    this one's job metrics included, go to a fresh multiprocess directory
    that each worker's ``/metrics`` sums.
    """
    if "prometheus_client" in sys.modules:
        # prometheus_client reads PROMETHEUS_MULTIPROC_DIR once, when first imported.
        raise PoisonwatchError("internal error: prometheus_client was imported before its multiprocess directory was set")
    metrics_dir = Path(tempfile.mkdtemp(prefix="poisonwatch-metrics-"))
    os.environ[MULTIPROCESS_DIR_VARIABLE] = str(metrics_dir)
    if args.config is not None:
        os.environ[CONFIG_FILE_VARIABLE] = str(Path(args.config).resolve())

    import uvicorn

    from monitor.api import freeze_startup_objects
    from monitor.daemon import Daemon

    scheduler = Daemon(config)
    try:
        scheduler.start(serve_http=False)
        freeze_startup_objects()
        logger.info(
            "serving on http://%s:%d with %d worker processes",
            config.server.host,
            config.server.port,
            args.workers,
        )
        # uvicorn's supervisor handles SIGINT and SIGTERM, stops the workers and returns.
        uvicorn.run(
            "monitor.asgi:create_app",
            factory=True,
            workers=args.workers,
            host=config.server.host,
            port=config.server.port,
            log_level="warning",
            access_log=False,
        )
    finally:
        scheduler.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from storage import migrations
    from storage.db import masked_url

    config = load_config(args.config)
    before = _revision_of(config.database.url)
    migrations.upgrade(config.database.url, args.revision)
    after = _revision_of(config.database.url)
    if before == after:
        print(f"database {masked_url(config.database.url)} is already at revision {after}; nothing to do")
    else:
        print(f"database {masked_url(config.database.url)} migrated from {before or 'empty'} to {after}")
    return 0


def _revision_of(url: str) -> str | None:
    from storage import migrations
    from storage.db import create_db_engine

    engine = create_db_engine(url)
    try:
        return migrations.current_revision(engine)
    finally:
        engine.dispose()


def _db_downgrade(args: argparse.Namespace) -> int:
    from storage import migrations
    from storage.db import masked_url

    config = load_config(args.config)
    migrations.downgrade(config.database.url, args.revision)
    print(f"database {masked_url(config.database.url)} is at revision {args.revision}")
    return 0


def _incidents_list(args: argparse.Namespace) -> int:
    from monitor.api import incident_summary
    from storage import queries
    from storage.db import create_session_factory

    config = load_config(args.config)
    session_factory = create_session_factory(open_migrated(config.database.url))
    with session_factory() as session:
        state = IncidentState(args.state) if args.state else None
        found = queries.list_incidents(session, state=state, model=args.model, limit=args.limit)
        incidents = [incident_summary(incident) for incident in found]
    if args.json:
        print(json.dumps([incident.model_dump() for incident in incidents], indent=2))
        return 0
    from monitor.report import print_incident_table

    print_incident_table(incidents)
    return 0


def _incidents_show(args: argparse.Namespace) -> int:
    from monitor.api import incident_detail
    from storage import queries
    from storage.db import create_session_factory

    config = load_config(args.config)
    session_factory = create_session_factory(open_migrated(config.database.url))
    with session_factory() as session:
        incident = queries.get_incident(session, args.id)
        if incident is None:
            print(f"incident {args.id} not found", file=sys.stderr)
            return 1
        detail = incident_detail(incident)
    if args.json:
        print(detail.model_dump_json(indent=2))
        return 0
    from monitor.report import print_incident

    print_incident(detail)
    return 0


def _incidents_act(args: argparse.Namespace) -> int:
    from monitor.api import incident_summary
    from storage import queries
    from storage.db import create_session_factory

    action = queries.acknowledge_incident if args.incidents_command == "ack" else queries.resolve_incident
    config = load_config(args.config)
    engine = open_migrated(config.database.url)
    try:
        with create_session_factory(engine).begin() as session:
            outcome, incident = action(session, args.id)
            if outcome == queries.TransitionOutcome.NOT_FOUND:
                print(f"incident {args.id} not found", file=sys.stderr)
                return 1
            if outcome == queries.TransitionOutcome.INVALID:
                print(
                    f"incident {args.id} is {incident.state.value}; only analyzed or failed incidents can be acknowledged",
                    file=sys.stderr,
                )
                return 1
            summary = incident_summary(incident)
    finally:
        engine.dispose()
    change = "now" if outcome == queries.TransitionOutcome.CHANGED else "already"
    print(f"incident {summary.id} is {change} {summary.state}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from monitor.auth import generate_token, hash_token

    token = generate_token()
    print(f"token (give it to the client; it is not stored): {token}")
    print(f'config line: token_sha256 = ["{hash_token(token)}"]')
    return 0


def _demo(args: argparse.Namespace) -> int:
    from monitor.demo import DemoOptions, run_demo

    options = DemoOptions(
        workdir=args.workdir,
        once=args.once,
        json_output=args.json,
        seed=args.seed,
        train_steps=args.train_steps,
        port=args.port,
        timeout_seconds=args.timeout,
    )
    return run_demo(options)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poisonwatch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--config", help="TOML config file; defaults apply when omitted")
        return command

    serve = with_config(commands.add_parser("serve", help="run the HTTP API and the job scheduler"))
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="API worker processes (default 1); with more than 1, this process runs only the scheduler",
    )
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo", help="plant a targeted poisoning on digits and let the daemon catch it")
    demo.add_argument("--workdir", default="poisonwatch-demo", help="folder for the model, data and SQLite database")
    demo.add_argument("--once", action="store_true", help="exit after the incident is analyzed")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, the training and the attack")
    demo.add_argument("--train-steps", type=int, default=None, help="optimizer steps per training run")
    demo.add_argument("--port", type=int, default=8000, help="port of the HTTP API; 0 picks a free one")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the analysis")
    demo.set_defaults(handler=_demo)

    db = commands.add_parser("db", help="database schema migrations").add_subparsers(dest="db_command", required=True)
    upgrade = with_config(db.add_parser("upgrade", help="migrate the database to the newest schema"))
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=_db_upgrade)
    downgrade = with_config(db.add_parser("downgrade", help="migrate the database down to a revision"))
    downgrade.add_argument("revision", help="target revision; 'base' removes every table")
    downgrade.set_defaults(handler=_db_downgrade)

    incidents = commands.add_parser("incidents", help="inspect incidents").add_subparsers(dest="incidents_command", required=True)
    listing = with_config(incidents.add_parser("list", help="list incidents, newest first"))
    listing.add_argument("--state", choices=[state.value for state in IncidentState], help="only incidents in this state")
    listing.add_argument("--model", help="only incidents of this model")
    listing.add_argument("--limit", type=int, default=50, help="maximum number of incidents to list (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_incidents_list)
    show = with_config(incidents.add_parser("show", help="show one incident with its suspects"))
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    show.set_defaults(handler=_incidents_show)
    ack = with_config(incidents.add_parser("ack", help="acknowledge an analyzed or failed incident"))
    ack.add_argument("id", type=int)
    ack.set_defaults(handler=_incidents_act)
    resolve = with_config(incidents.add_parser("resolve", help="resolve an incident in any state"))
    resolve.add_argument("id", type=int)
    resolve.set_defaults(handler=_incidents_act)

    token = commands.add_parser("token", help="bearer tokens for the API").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="print a new token and the digest to put in [server] token_sha256")
    create.set_defaults(handler=_token_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    # A crash in native code (JAX, the database drivers) then leaves every
    # thread's Python stack on standard error, which is the daemon's log.
    # Under pytest it is on already, and a captured stderr has no file
    # descriptor to write to.
    if not faulthandler.is_enabled():
        with contextlib.suppress(io.UnsupportedOperation):
            faulthandler.enable()
    try:
        return args.handler(args)
    except PoisonwatchError as error:
        print(f"poisonwatch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
