"""The Python API on the real default model: text, finish reasons, stops, seeds, limits."""

import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model import LLM, SamplingParams
from model.engine.scheduler import RequestFailed

ROOT = Path(__file__).resolve().parent.parent

GREEDY = SamplingParams(temperature=0.0)


def test_greedy_chat_is_the_reference_continuation_up_to_end_of_turn(llm, golden):
    prompt = golden["prompts"][0]
    reference = prompt["greedy"]
    end = next(i for i, t in enumerate(reference) if t in llm.tokenizer.stop_ids)
    result = llm.generate(prompt["ids"], GREEDY)
    assert result.finish_reason == "stop"
    assert list(result.token_ids) == reference[: end + 1]  # the end-of-turn token is counted
    assert result.text == llm.tokenizer.decode(reference[:end], skip_special_tokens=True)
    assert llm.chat(prompt["messages"], temperature=0) == result.text


def test_stream_pieces_join_to_the_full_text(llm, golden):
    messages = golden["prompts"][2]["messages"]
    pieces = list(llm.chat(messages, stream=True, temperature=0, max_tokens=40))
    assert len(pieces) > 5
    assert "".join(pieces) == llm.chat(messages, temperature=0, max_tokens=40)


def test_max_tokens_gives_length(llm, golden):
    result = llm.generate(golden["prompts"][2]["ids"], SamplingParams(temperature=0, max_tokens=7))
    assert result.finish_reason == "length"
    assert list(result.token_ids) == golden["prompts"][2]["greedy"][:7]


def test_stop_string_cuts_the_text_before_it(llm, golden):
    ids = golden["prompts"][0]["ids"]
    full = llm.generate(ids, GREEDY).text
    assert "Paris" in full
    stopped = llm.generate(ids, SamplingParams(temperature=0, stop=("Paris", "zzz")))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index("Paris")]


def test_seed_reproduces_sampling_and_differs_between_seeds(llm, golden):
    ids = golden["prompts"][1]["ids"]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=1234)
    first = llm.generate(ids, params)
    assert llm.generate(ids, params).token_ids == first.token_ids
    others = {
        llm.generate(ids, SamplingParams(temperature=1.0, max_tokens=24, seed=s)).token_ids
        for s in (1, 2, 3)
    }
    assert len(others | {first.token_ids}) > 1


def test_context_overflow_names_the_counts(llm):
    ids = [1] * 500
    counts = r"513 tokens \(500 in the prompt, 13 in the completion\)"
    with pytest.raises(ValueError, match=r"maximum context length is 512 tokens.*" + counts):
        llm.generate(ids, SamplingParams(max_tokens=13))
    with pytest.raises(ValueError, match="your prompt resulted in 600 tokens"):
        llm.generate([1] * 600, SamplingParams())


def test_a_script_using_the_python_api_exits_cleanly():
    """The scheduler thread is stopped at exit: the process ends with status 0 instead of
    aborting while the thread is inside XLA."""
    script = (
        "import os\n"
        "from model import LLM, SamplingParams\n"
        "llm = LLM(max_seq_len=512, batch=8, compile_cache=os.environ['JAXCHAT_COMPILE_CACHE'])\n"
        "ids = llm.encode_chat([{'role': 'user', 'content': 'Hi'}])\n"
        "params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)\n"
        "print(llm.generate(ids, params).token_ids)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    assert len(done.stdout.strip().strip("()").split(",")) == 4


def test_the_background_loader_is_waited_for_at_exit_when_a_daemon_thread_starts_it():
    """`warmup(wait=False)` may be called from a daemon thread (the server's model loader
    was one); the thread that loads the other executables must not inherit that: at exit
    the interpreter waits for it to finish the executable it is on, where a daemon thread
    inside XLA's compiler when the interpreter finalised aborted the server's worker
    ("terminate called ... FATAL: exception not rethrown", seen on a 2x3 mesh's server
    stopped while it compiled)."""
    loading = threading.Event()
    release = threading.Event()

    class Variants:
        def warmup(self, count=None):
            pass

        def preload(self, count=None, until=None):
            if until is not None:  # the background's call: hold it while the test looks
                loading.set()
                release.wait(30)

        def upgrade(self, until=None):
            pass

    served = types.SimpleNamespace(
        engine=types.SimpleNamespace(variants=Variants()),
        compile_cache=None,
        scheduler=types.SimpleNamespace(idle=True),
        _push=lambda: None,
    )
    before = set(threading.enumerate())
    starter = threading.Thread(target=LLM.warmup, args=(served,), kwargs={"wait": False})
    starter.daemon = True
    starter.start()
    starter.join(30)
    assert loading.wait(30)
    [background] = [t for t in set(threading.enumerate()) - before if t.name == "preload"]
    release.set()
    assert not background.daemon
    background.join(30)


class BreakingConstraint:
    """A grammar (any text allowed) whose engine breaks at its third mask."""

    def __init__(self, grammar: str) -> None:
        self.fills = 0

    def fill(self, bitmask, row):
        self.fills += 1
        if self.fills == 3:
            raise RuntimeError("the grammar engine broke")

    def accept(self, token):
        return True


@pytest.mark.parametrize("fault", ["admission", "grammar"])
def test_a_fault_in_one_request_fails_it_alone(llm, golden, monkeypatch, fault):
    """Among concurrent greedy requests, one fails in the engine (its admission, or its
    grammar mid-stream); the others still give the reference tokens."""
    poisoned = [7, 7, 7, 7]
    rows = []
    sampling, admit = llm.engine.sampling, llm.engine.admit

    def marked_sampling(params, seed, prompt_ids=()):
        row = sampling(params, seed, prompt_ids)
        if list(prompt_ids) == poisoned:
            rows.append(row)
        return row

    def faulty_admit(state, slot, row):
        if fault == "admission" and any(row is r for r in rows):
            raise RuntimeError("admission of an odd request failed")
        return admit(state, slot, row)

    monkeypatch.setattr(llm.engine, "sampling", marked_sampling)
    monkeypatch.setattr(llm.engine, "admit", faulty_admit)
    if fault == "grammar":  # shadows the cached property for this test only
        broken = types.SimpleNamespace(matcher=BreakingConstraint)
        monkeypatch.setitem(vars(llm), "grammars", broken)

    prompts = golden["prompts"]
    expected = [p["greedy"][:12] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    grammar = "any text" if fault == "grammar" else None
    bad = SamplingParams(temperature=0, max_tokens=12, grammar=grammar)
    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        good = [pool.submit(llm.generate, p["ids"], params) for p in prompts]
        failed = pool.submit(llm.generate, poisoned, bad)
        with pytest.raises(RequestFailed, match="RuntimeError: .* failed|broke"):
            failed.result()
        assert [list(f.result().token_ids) for f in good] == expected
    assert not llm.failed and llm.scheduler.active == 0
    assert list(llm.generate(prompts[0]["ids"], params).token_ids) == expected[0]
