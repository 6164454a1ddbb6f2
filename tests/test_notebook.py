"""The quickstart notebook runs top to bottom and gives the reference's greedy answer."""

import json
from pathlib import Path

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(golden, monkeypatch):
    monkeypatch.chdir(NOTEBOOK.parent.parent)
    namespace: dict = {}
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)

    llm = namespace["llm"]
    reference = golden["prompts"][0]["greedy"]
    end = next(i for i, t in enumerate(reference) if t in llm.tokenizer.stop_ids)
    assert namespace["answer"] == llm.tokenizer.decode(reference[:end])
    assert namespace["cut"] == namespace["answer"][: namespace["answer"].index("Paris")]
    assert len(namespace["story"]) > 10
