"""A llama.cpp OpenAI-compatible server for one GGUF model, as a child process.

    python -m shared.workers.llamacpp_server --model PATH --port N [--alias NAME] ...

xllamacpp runs the server inside the process that starts it and has no way to stop it, so the
`local` worker runs this module as a child and stops it by its PID. It binds 127.0.0.1 only.
Needs the `local` extra (xllamacpp).
"""

import argparse
import os
import signal
import sys
import threading


def main() -> None:
    """Start the server and keep the process alive until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the GGUF file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", default="local", help="the model's name in the API")
    parser.add_argument("--context", type=int, default=2048, help="context size, in tokens")
    parser.add_argument("--parallel", type=int, default=2, help="requests decoded at once")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chat-template", default="gemma", help="llama.cpp's built-in one")
    args = parser.parse_args()
    try:
        import xllamacpp
    except ImportError:
        print("the local worker needs xllamacpp: pip install 'prompt-orchestrator[local]'",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.model_alias = {args.alias}
    params.n_ctx = args.context
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    # The GGUFs this is meant for carry no chat template: use llama.cpp's built-in one by name
    # (with Jinja on, the name itself would become the template).
    params.chat_template = args.chat_template
    params.use_jinja = False
    params.endpoint_metrics = True
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xllamacpp.Server(params)  # serves from its own threads
    stop.wait()
    del server
    os._exit(0)  # the server's threads have no stop: end the process with them


if __name__ == "__main__":
    main()
