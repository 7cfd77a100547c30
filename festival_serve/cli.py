"""``festival-serve``: the project's own commands."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import yaml

from festival_serve import DATA_DIR
from festival_serve.serving import auth
from festival_serve.runtime.backends import BackendUnavailable

DEFAULT_CONFIG = Path("serve_config.yaml")
SAMPLE_SCENE = DATA_DIR / "sample_scene.jpg"


def cmd_up(args: argparse.Namespace) -> int:
    from festival_serve.ops import up
    from festival_serve.runtime.devices import cuda_available
    from festival_serve.pipeline.serve_config import check_serve_config

    has_gpu = cuda_available() and not args.cpu
    # --public: HAProxy takes --host:--port, and Serve's proxy (with it every Ray port) stays on loopback behind it.
    host = args.host or ("0.0.0.0" if args.public else "127.0.0.1")
    serve_host, serve_port = ("127.0.0.1", args.internal_port or args.port + 1) if args.public else (host, args.port)
    config, changes = up.local_profile(
        up.load_config(args.config), host=serve_host, port=serve_port, model_store=args.model_store,
        has_gpu=has_gpu, base_dir=Path.cwd(), api_keys_file=args.api_keys_file,
    )
    try:  # before Ray starts: a deployment without its batch settings would otherwise fail (or batch) silently
        check_serve_config(config)
    except ValueError as e:
        print(f"festival-serve: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    keys_files = [(app.get("args", {}).get("ingress") or {}).get("api_keys_file") for app in config["applications"]]
    try:  # fail now, not after the models load in the replicas
        for keys_file in filter(None, keys_files):
            auth.KeyRing.from_file(keys_file)
    except auth.KeysFileError as e:
        print(f"festival-serve: {e}", file=sys.stderr)
        return 2
    if args.metrics_port and up.port_in_use(args.metrics_port):
        print(f"festival-serve: --metrics-port {args.metrics_port} is in use; pass a free port (0: any free one)",
              file=sys.stderr)
        return 2
    front = None
    if args.public:
        front = _start_front_proxy(host, args.port, serve_host, serve_port, up.pipeline_args(config).ingress)
        if front is None:
            return 2
    print(f"festival-serve: deploying {args.config} locally")
    for change in changes:
        print(f"  {change}")
    up.prepare_models(config, has_gpu=has_gpu)
    try:
        metrics_host = up.metrics_host_for(serve_host, args.metrics_host)
    except ValueError as e:
        print(f"festival-serve: {e}", file=sys.stderr)
        return 2
    up.start(config, offline=not args.allow_network, dashboard=not args.no_dashboard,
             metrics_port=args.metrics_port or None, metrics_host=metrics_host)
    where = "loopback only, with every Ray port" if up.is_loopback(metrics_host) else \
        "every interface, and Ray's ports on this machine's address"
    print(f"festival-serve: Prometheus metrics at http://127.0.0.1:{up.metrics_port()}/metrics ({where}; "
          "scrape config: cluster/prometheus.yml, dashboard: cluster/grafana-dashboard.json)")
    stopping = False

    def stop(*_):
        nonlocal stopping
        if not stopping:
            stopping = True
            print("\nfestival-serve: stopping " + ("the front proxy, " if front else "") + "Serve and Ray …")
            if front:
                front.stop()
            up.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        up.wait_until_running(args.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"festival-serve: {e}", file=sys.stderr)
        if front:
            front.stop()
        up.stop()
        return 1
    url = f"http://{host}:{args.port}"
    print(f"festival-serve: serving {url}  (POST {url}/v1/analyze, GET {url}/v1/models; Ctrl-C stops)")
    if not all(keys_files):
        print(f"festival-serve: no API keys file: /v1 is open to anyone who can reach {host}:{args.port} "
              "(make a key with `festival-serve keys new --file PATH`, then pass --api-keys-file PATH)")
    if not args.no_dashboard:
        print("festival-serve: inspect with `RAY_AUTH_MODE=token serve status` (Ray token auth is on)")
    while True:
        time.sleep(3600)


def _start_front_proxy(host: str, port: int, serve_host: str, serve_port: int, ingress):
    """``up --public``'s HAProxy on ``host:port`` in front of Serve's proxy at ``serve_host:serve_port``, started
    before Ray (a missing haproxy or a taken port fails in a second), stopped at exit; None after saying why not."""
    import atexit
    import shutil
    import tempfile

    from festival_serve.ops import front_proxy, up

    if up.port_in_use(serve_port):
        print(f"festival-serve: --internal-port {serve_port} (Serve's own port behind the front proxy) is in use; "
              "pass a free one", file=sys.stderr)
        return None
    settings = front_proxy.FrontProxySettings.for_ingress(ingress, listen_host=host, listen_port=port,
                                                          backend_host=serve_host, backend_port=serve_port)
    directory = Path(tempfile.mkdtemp(prefix="festival-front-proxy-"))
    atexit.register(shutil.rmtree, directory, True)  # runs after the stop below (last registered, first run)
    try:
        front = front_proxy.start(settings, directory)
    except front_proxy.FrontProxyError as e:
        print(f"festival-serve: --public: {e}", file=sys.stderr)
        return None
    atexit.register(front.stop)
    print(f"festival-serve: front proxy: HAProxy on {host}:{port} -> Serve's proxy on {serve_host}:{serve_port} "
          f"(loopback only; config {front.config_path})")
    print("  in HAProxy:")
    for line in front_proxy.protections(settings):
        print(f"    {line}")
    print("  in the ingress:")
    for line in front_proxy.ingress_protections(ingress):
        print(f"    {line}")
    return front


def cmd_demo(args: argparse.Namespace) -> int:
    import httpx

    if args.scene_seed is not None:
        from festival_serve.serving.imaging import encode_jpeg
        from festival_serve.world.synth import generate_scene

        data, content_type = encode_jpeg(generate_scene(args.scene_seed).image), "image/jpeg"
    else:
        data = Path(args.image).read_bytes()
        content_type = {".png": "image/png", ".webp": "image/webp"}.get(Path(args.image).suffix.lower(), "image/jpeg")
    try:
        reply = httpx.post(f"{args.url}/v1/analyze", content=data, params={"describe": str(not args.no_describe).lower()},
                           headers={"content-type": content_type}, timeout=args.timeout)
    except httpx.HTTPError as e:
        print(f"festival-serve: cannot reach {args.url}: {e} (is `festival-serve up` running?)", file=sys.stderr)
        return 1
    body = reply.json()
    print(json.dumps(body, indent=2, ensure_ascii=False))
    if args.out and reply.status_code == 200:
        from festival_serve.ops.annotate import annotate
        from festival_serve.serving.imaging import decode_image

        annotate(decode_image(data, max_pixels=1 << 30), body, layout="outdoor").save(args.out)
        print(f"annotated image: {args.out}", file=sys.stderr)
    return 0 if reply.status_code == 200 else 1


def cmd_models_pull(args: argparse.Namespace) -> int:
    from festival_serve.ops import up

    from festival_serve.models.scene_describer import describer
    pipeline = up.pipeline_args(up.load_config(args.config), args.model_store)
    target = describer.pull(pipeline.scene_describer, model_store=Path(pipeline.model_store))
    print(f"scene describer: {pipeline.scene_describer.hub_id} → {target}")
    print("sign detector / hazard cells: copy your checkpoints to "
          f"{pipeline.store_path(pipeline.sign_detector.weights)} and {pipeline.store_path(pipeline.hazard_cells.weights)}")
    return 0


def cmd_models_status(args: argparse.Namespace) -> int:
    from festival_serve.ops import up
    from festival_serve.pipeline.stages import STAGES

    pipeline = up.pipeline_args(up.load_config(args.config), args.model_store)
    for stage in STAGES:
        settings = stage.settings(pipeline)
        # A stage's own weights, then any further network it runs (the sign classifier).
        rows = [(stage.name, stage.weights(settings))]
        rows += [(n.name, n.weights(settings)) for n in stage.networks if n.name != stage.name]
        for name, weights in rows:
            if weights is None:
                state, path = ("bundled (rapidocr PP-OCR)", "") if not stage.networks else ("off", "")
            else:
                path = pipeline.store_path(weights)
                state = "present" if path.exists() else "MISSING"
            print(f"{name:16} {state:26} {path}")
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    """Make an API key, append its digest to ``--file`` (created owner-only, 0600) and show the key once."""
    path: Path = args.file
    if path.exists():
        try:  # never append to a file the servers would refuse to load
            auth.read_digests(path)
        except auth.KeysFileError as e:
            print(f"festival-serve: {e}", file=sys.stderr)
            return 2
    existing = path.read_bytes() if path.exists() else b""
    key = auth.new_key()
    label = " ".join((args.label or "").split())  # one line, whatever was typed
    line = auth.digest(key) + (f"  # {label}" if label else "") + "\n"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8") as f:
        f.write(("\n" if existing and not existing.endswith(b"\n") else "") + line)
    print(key)
    print(f"This key is shown once and stored nowhere: {path} keeps only its SHA-256 digest. "
          "Send it as `Authorization: Bearer <key>`.")
    return 0


def cmd_engines_build(args: argparse.Namespace) -> int:
    """Build (or find cached) TensorRT engines for every exportable network, as serving would load them."""
    from festival_serve.runtime import tensorrt_engines
    from festival_serve.ops import up
    from festival_serve.pipeline.stages import NETWORKS

    pipeline = up.pipeline_args(up.load_config(args.config), args.model_store)
    for network in NETWORKS:
        source = network.source(pipeline)
        if source is None:
            print(f"{network.name}: off in this config, skipped")
            continue
        print(f"{network.name}: building TensorRT {'fp32' if args.fp32 else 'fp16'} engine on {args.device} …")
        engine_file = tensorrt_engines.build_engine(
            source.onnx_file(), fp16=not args.fp32, max_batch=args.max_batch, device=args.device,
            rebuild=args.force_rebuild, progress=lambda msg, n=network.name: print(f"{n}: {msg}"),
        )
        print(f"{network.name}: ready ({engine_file})")
    return 0


#: Commands whose module brings its own arguments (``add_arguments``) and runs them: (name, module, function, help).
TOOL_COMMANDS: tuple[tuple[str, str, str, str], ...] = (
    ("eval", "festival_serve.measure.evaluate", "cmd_eval",
     "score a running deployment on held-out synthetic scenes (JSON report last)"),
    ("validate", "festival_serve.ops.validate", "cmd_validate",
     "check every local backend against torch fp32 on held-out scenes, and time it (JSON report last with --json; "
     "exit 1 on a failure)"),
    ("bench", "festival_serve.measure.bench.streams", "cmd_bench",
     "benchmark the graph against the single-process baseline (report in docs/bench)"),
    ("watch", "festival_serve.ops.watch", "cmd_watch",
     "stream a video file, webcam or RTSP/HTTP camera to WS /v1/streams: print each sign and hazard once, write "
     "the annotated video (--out) and the messages (--json)"),
    ("check-gpu", "festival_serve.ops.check_gpu", "cmd_check_gpu",
     "where each stage really runs (device, precision, runtime, GPU share) and this machine's GPUs; warns on "
     "over-committed GPUs"),
)


def _training_module(name: str):
    return importlib.import_module(f"festival_serve.training.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="festival-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local Ray and deploy the whole graph (Ctrl-C stops it)")
    up.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: %(default)s)")
    up.add_argument("--host", default=None, help="where clients connect (default 127.0.0.1; with --public 0.0.0.0)")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--public", action="store_true",
                    help="face the public: HAProxy (Debian's haproxy package) on --host:--port, with its header "
                         "deadline, size limits and connection caps, in front of Serve, whose proxy then listens on "
                         "127.0.0.1:--internal-port only")
    up.add_argument("--internal-port", type=int,
                    help="with --public: Serve's own HTTP port, on 127.0.0.1 (default: --port + 1)")
    up.add_argument("--model-store", help="override args.model_store")
    up.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    up.add_argument("--allow-network", action="store_true", help="do not block connections to other machines")
    up.add_argument("--no-dashboard", action="store_true",
                    help="skip Ray's dashboard (~1 GB less memory; `serve status` then cannot connect)")
    up.add_argument("--dry-run", action="store_true",
                    help="print the config this machine would run (feed it to `serve run`) and exit")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for the graph to start")
    up.add_argument("--metrics-port", type=int, default=8080,
                    help="port of this node's Prometheus /metrics (Ray's, Serve's and the pipeline's; on "
                         "--metrics-host; 0: any free port); default: %(default)s")
    up.add_argument("--metrics-host", default=None,
                    help="where the node's Prometheus metrics (and with them every Ray port) listen: 127.0.0.1 or "
                         "0.0.0.0 (default: loopback when --host is loopback, else every interface)")
    up.add_argument("--api-keys-file", help="require an API key on /v1: the file of key digests "
                                            "(`festival-serve keys new`); default: the config's, else /v1 is open")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="post the bundled sample scene to a running server and print the answer")
    demo.add_argument("--url", default="http://127.0.0.1:8000")
    demo.add_argument("--image", default=str(SAMPLE_SCENE))
    demo.add_argument("--scene-seed", type=int, help="post a generated synthetic scene instead of --image")
    demo.add_argument("--no-describe", action="store_true", help="skip the scene description")
    demo.add_argument("--timeout", type=float, default=120)
    demo.add_argument("--out", type=Path, help="also write the image annotated with the answer (PNG)")
    demo.set_defaults(func=cmd_demo)

    for name, module, command, help_ in TOOL_COMMANDS:
        tool = importlib.import_module(module)
        parser_of_tool = sub.add_parser(name, help=help_)
        tool.add_arguments(parser_of_tool)
        parser_of_tool.set_defaults(func=getattr(tool, command))

    models = sub.add_parser("models", help="model weights in the model store")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, func, help_ in (("pull", cmd_models_pull, "fetch real weights (needs internet)"),
                              ("status", cmd_models_status, "show which weights are present")):
        p = models_sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        p.add_argument("--model-store", help="override args.model_store")
        p.set_defaults(func=func)

    keys = sub.add_parser("keys", help="API keys for /v1 (the servers read a file of their SHA-256 digests)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new_key = keys_sub.add_parser("new", help="make a key, append its digest to --file and print the key once")
    new_key.add_argument("--file", type=Path, required=True,
                         help="the keys file (ingress.api_keys_file); created with mode 0600 if absent")
    new_key.add_argument("--label", help="a note kept beside the digest (who holds the key), to revoke it by")
    new_key.set_defaults(func=cmd_keys_new)

    from festival_serve.measure import load

    load_parser = load.add_arguments(sub.add_parser(
        "load", help="drive a running graph through a festival day (profile), recording replicas per second"))
    load_parser.set_defaults(func=load.cmd_load)
    # Its own parser lives in festival_serve.ops.manifests; main() hands it the rest of the command line.
    sub.add_parser("cluster", help="render cluster manifests from serve_config.yaml, or run a multi-node cluster on "
                   "this machine (`cluster local up`; see cluster/README.md)")

    train = sub.add_parser("train", help="retrain an embedded model from scratch on generated scenes")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    for name, module, help_ in (("hazards", "hazard_cells", "YOLIC-M2 hazard cells (plain PyTorch loop, as in the paper)"),
                                ("signs", "sign_detector", "YOLO sign detector (ultralytics' trainer)"),
                                ("sign-classes", "sign_classifier", "sign classifier on detected crops (ultralytics' trainer)"),
                                ("sign-text", "sign_reader", "Vietnamese sign-text recognizer (CRNN, the reader's rec_model)"),
                                ("describer", "scene_describer", "scene describer: a small Idefics3 (SmolVLM's architecture)")):
        p = train_sub.add_parser(name, help=help_)
        _training_module(module).add_arguments(p)
        p.set_defaults(func=lambda a, m=module: _training_module(m).cmd_train(a, "festival-serve " + shlex.join(sys.argv[1:])))

    engines = sub.add_parser("engines", help="TensorRT engines for the detectors")
    engines_sub = engines.add_subparsers(dest="engines_command", required=True)
    build = engines_sub.add_parser("build", help="build and cache engines ahead of time (per GPU model and TensorRT version)")
    build.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    build.add_argument("--model-store", help="override args.model_store")
    build.add_argument("--device", default="cuda")
    build.add_argument("--fp32", action="store_true", help="build fp32 engines instead of fp16")
    build.add_argument("--max-batch", type=int, default=32,
                       help="largest batch the engines accept (default: %(default)s; >= the YAML's max_batch_size)")
    build.add_argument("--force-rebuild", action="store_true", help="rebuild even when a cached engine exists")
    build.set_defaults(func=cmd_engines_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:
        from festival_serve.ops import manifests

        return manifests.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, BackendUnavailable) as e:
        print(f"festival-serve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
