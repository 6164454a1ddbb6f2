"""The `jaxchat` command: serve, chat in the terminal, benchmark, convert.

    jaxchat serve   [--host 0.0.0.0] [--model M] [--port 8080] [--max-batch 32] [--max-queue N] …
    jaxchat chat    [--model M] [--system "…"] [--temperature 0.7] [--max-tokens 512]
    jaxchat bench   [--model M] [--decode-tokens 256] [--repeats 3]
    jaxchat convert SRC DEST [--int8] [--dtype float32|bfloat16]

`serve` runs the same functions-framework app as `make serve`; its options
are the settings (handler/settings.py: `--max-batch` sets JAXCHAT_MAX_BATCH),
generated from them and passed on through the environment, plus `--host`.
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
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from handler.settings import Settings

MODEL_HELP = "a GGUF file, a Hugging Face or jaxchat checkpoint directory, or gs:// to one"
CACHE_HELP = "keep compiled executables here (a directory or gs:// prefix)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"serve": run_serve, "chat": run_chat, "bench": run_bench, "convert": run_convert}
    return commands[args.command](args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxchat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI API over HTTP")
    serve.add_argument("--host", default="0.0.0.0", help="the address to listen on")
    for name, field in Settings.model_fields.items():
        serve.add_argument(f"--{name.replace('_', '-')}", **setting_option(name, field))

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


def setting_option(name: str, field: FieldInfo) -> dict[str, Any]:
    """The argparse keywords of the `serve` option for setting `name`; not given, it
    is None and the setting keeps its value (from the environment, or its default)."""
    variable = Settings.variable(name)
    text = f"{Settings.docs().get(name, '')} ({variable})".replace("%", "%%")
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        [kind] = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind), "help": text}
    if kind is bool:  # --name / --no-name
        return {"action": argparse.BooleanOptionalAction, "help": text}
    if kind in (int, float, str):
        return {"type": kind, "help": text}
    if typing.get_origin(kind) is list:  # comma-separated, as in the environment
        return {"metavar": "A,B,...", "help": text}
    raise TypeError(f"setting {name} ({kind}) has no command-line form")


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The functions-framework command line and the environment settings for `serve`."""
    spec = importlib.util.find_spec("main")
    if spec is None or spec.origin is None:
        raise SystemExit("jaxchat serve: the functions-framework source main.py is not installed")
    given = {name: getattr(args, name) for name in Settings.model_fields}
    given = {name: value for name, value in given.items() if value is not None}
    try:
        settings = Settings(**given)  # what the server will read: refuse bad values now
    except ValidationError as exc:
        raise SystemExit(f"jaxchat serve: {exc}") from None
    env = {Settings.variable(name): str(value) for name, value in given.items()}
    command = [
        sys.executable,
        "-m",
        "functions_framework",
        "--target=app",
        f"--source={spec.origin}",
        f"--host={args.host}",
        f"--port={settings.port}",
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
