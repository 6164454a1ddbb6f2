"""The `jaxchat` command: serve, chat in the terminal, benchmark, convert.

    jaxchat serve   [--model M] [--port 8080] [--host 0.0.0.0] [--max-batch 32] [--kv-pool N] …
    jaxchat chat    [--model M] [--system "…"] [--temperature 0.7] [--max-tokens 512]
    jaxchat bench   [--model M] [--decode-tokens 256] [--repeats 3]
    jaxchat convert SRC DEST [--int8] [--dtype float32|bfloat16]

`serve` runs the same functions-framework app as `make serve`; its options
are the JAXCHAT_* settings (README), passed on through the environment.
`chat` streams replies from the Python API with no HTTP; `/reset` clears the
conversation, `/exit` (or Ctrl-D) leaves.
`convert` writes a model (any model URI; `default` for the bundled one) as a
jaxchat Orbax checkpoint directory (model/weights/orbax.py), which every `--model`
accepts and which restores sharded onto the mesh; `--int8` stores the matmul
weights as int8 with a scale per output row.
"""

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

MODEL_HELP = "a GGUF file, a Hugging Face or jaxchat checkpoint directory, or gs:// to one"
CACHE_HELP = "keep compiled executables here (a directory or gs:// prefix)"

# `serve` options → the settings they set (handler/settings.py).
SERVE_SETTINGS = {
    "model": "JAXCHAT_MODEL",
    "model_name": "JAXCHAT_MODEL_NAME",
    "max_seq_len": "JAXCHAT_MAX_SEQ_LEN",
    "max_batch": "JAXCHAT_MAX_BATCH",
    "kv_pool": "JAXCHAT_KV_POOL",
    "mesh": "JAXCHAT_MESH",
    "dtype": "JAXCHAT_DTYPE",
    "unrolled_decode": "JAXCHAT_UNROLLED_DECODE",
    "api_keys": "JAXCHAT_API_KEYS",
    "compile_cache": "JAXCHAT_COMPILE_CACHE",
    "port": "PORT",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"serve": run_serve, "chat": run_chat, "bench": run_bench, "convert": run_convert}
    return commands[args.command](args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxchat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI API over HTTP")
    serve.add_argument("--model", help=MODEL_HELP)
    serve.add_argument("--model-name")
    serve.add_argument("--max-seq-len", type=int)
    serve.add_argument("--max-batch", type=int)
    serve.add_argument(
        "--kv-pool", help="KV pool: tokens (65536) or a fraction of free memory (0.5)"
    )
    serve.add_argument("--mesh", help="DATAxMODEL, e.g. 2x4")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    serve.add_argument(
        "--unrolled-decode", choices=["auto", "on", "off"], help="faster one-row steps on CPU"
    )
    serve.add_argument("--api-keys", help="comma-separated bearer keys")
    serve.add_argument("--compile-cache", help=CACHE_HELP)
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    serve.add_argument("--host", default="0.0.0.0")

    chat = commands.add_parser("chat", help="chat with the model in the terminal")
    chat.add_argument("--model", help=MODEL_HELP)
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--max-seq-len", type=int, help="default: the model's context")
    chat.add_argument("--seed", type=int)
    chat.add_argument("--compile-cache", help=CACHE_HELP)

    bench = commands.add_parser("bench", help="batch-1 decode and prefill rates")
    bench.add_argument("--model", help=MODEL_HELP)
    bench.add_argument("--decode-tokens", type=int, default=256)
    bench.add_argument("--prefill-tokens", type=int, default=512)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--compile-cache", help=CACHE_HELP)

    convert = commands.add_parser("convert", help="write a model as a jaxchat Orbax checkpoint")
    convert.add_argument(
        "src", help="GGUF path, Hugging Face directory or gs:// URI; 'default': the bundled model"
    )
    convert.add_argument("dest", help="the checkpoint directory to create (new or empty)")
    convert.add_argument(
        "--int8", action="store_true", help="int8 weight-only quantization of the matmul weights"
    )
    convert.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="how the other weights are stored (default float32)",
    )

    return parser


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The functions-framework command line and the environment settings for `serve`."""
    spec = importlib.util.find_spec("main")
    if spec is None or spec.origin is None:
        raise SystemExit("jaxchat serve: the functions-framework source main.py is not installed")
    env = {
        name: str(getattr(args, option))
        for option, name in SERVE_SETTINGS.items()
        if getattr(args, option) is not None
    }
    command = [
        sys.executable,
        "-m",
        "functions_framework",
        "--target=app",
        f"--source={spec.origin}",
        f"--host={args.host}",
        f"--port={args.port}",
    ]
    return command, env


def run_serve(args: argparse.Namespace) -> int:
    command, env = serve_command(args)
    os.environ.update(env)
    os.execv(command[0], command)  # the server replaces this process (signals reach it)
    return 0  # not reached


def status(message: str) -> None:
    """A progress line on stderr, so piped replies stay clean."""
    print(message, file=sys.stderr, flush=True)


def load(model: str | None, **kwargs):
    from model import LLM

    status(f"loading {model or 'the bundled SmolLM2-135M-Instruct'} …")
    start = time.perf_counter()
    llm = LLM(model, **kwargs)
    status(f"loaded in {time.perf_counter() - start:.1f} s")
    return llm


def run_chat(args: argparse.Namespace, llm=None, stdin=None, stdout=None) -> int:
    """The interactive loop (the model and streams are parameters so tests can drive it)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    llm = llm or load(
        args.model, max_seq_len=args.max_seq_len, batch=2, compile_cache=args.compile_cache
    )
    from model import SamplingParams

    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    status("type a message; /reset clears the conversation, /exit leaves")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if text == "/reset":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = llm.encode_chat(system + history)
        budget = min(args.max_tokens, llm.max_seq_len - len(ids))
        if budget <= 0:
            status("the conversation fills the context: /reset to start over")
            history.pop()
            continue
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_tokens=budget, seed=args.seed
        )
        reply = []
        for delta in llm.stream(ids, params):
            reply.append(delta.text)
            stdout.write(delta.text)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def run_bench(args: argparse.Namespace) -> int:
    from benchmarks import engine_bench

    llm = load(
        args.model,
        max_seq_len=max(1024, args.prefill_tokens + 1),
        batch=1,
        compile_cache=args.compile_cache,
    )
    status("compiling …")
    start = time.perf_counter()
    llm.warmup()
    status(f"compiled in {time.perf_counter() - start:.1f} s")
    decode = engine_bench.decode_rate(llm, args.decode_tokens, args.repeats)
    prefill = engine_bench.prefill_rate(llm, args.prefill_tokens, args.repeats)
    print(f"decode, batch 1:              {decode:7.1f} tok/s")
    print(f"prefill, {args.prefill_tokens}-token prompt:   {prefill:7.1f} tok/s")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Convert SRC to the checkpoint DEST; the last line (stdout) is DEST and its size."""
    from model.weights.orbax import convert, directory_bytes
    from model.weights.sources import resolve_model

    start = time.perf_counter()
    try:
        src = resolve_model(None if args.src == "default" else args.src)
        quantize = "int8" if args.int8 else None
        source = str(src) if args.src == "default" else args.src
        convert(src, args.dest, quantize=quantize, dtype=args.dtype, source=source, report=status)
    except (OSError, ValueError) as e:
        status(f"jaxchat convert: error: {e}")
        return 1
    status(f"converted in {time.perf_counter() - start:.1f} s")
    print(f"{Path(args.dest)}  {directory_bytes(args.dest) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
