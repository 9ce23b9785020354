"""jaxprune.evaluation.harness: the lm-evaluation-harness adapter, checked against torch/transformers and numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

import jaxprune as jp                                                      # noqa: E402
from jaxprune.evaluation import harness                                               # noqa: E402
from jaxprune.errors import InvalidArgumentError                           # noqa: E402
from lm_eval.api.instance import Instance                                  # noqa: E402
from lm_eval.api.model import LM                                           # noqa: E402

from conftest import tiny_llama                                            # noqa: E402
from evaluation_helpers import VOCAB, ByteTok, np_scores, successor_params, tiny_params  # noqa: E402

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny transformers Llama saved with save_pretrained, and the same model loaded by jaxprune."""
    model = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    d = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(d)
    return model, jp.load(str(d)), str(d)


def torch_scores(model, ids):
    """Float64 log-probs of ids[1:] and their argmax flags under the torch model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    tgt = torch.tensor(ids[1:])
    return logp[torch.arange(len(tgt)), tgt].numpy(), (logits.argmax(-1) == tgt).numpy()


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_is_an_lm_eval_model(hf):
    _, params, _ = hf
    lm = harness.JaxpruneLM(params, ByteTok())
    assert isinstance(lm, LM) and issubclass(harness.JaxpruneLM, LM)
    assert lm.max_length == 128 and lm.batch_size == 8
    assert harness.register_with_lm_eval() is harness.JaxpruneLM
    assert harness.register_with_lm_eval() is harness.JaxpruneLM              # again: a no-op
    assert lm_eval.api.registry.get_model("jaxprune") is harness.JaxpruneLM
    with pytest.raises(InvalidArgumentError, match="max_position_embeddings"):
        harness.JaxpruneLM(params, ByteTok(), max_length=1000)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        harness.JaxpruneLM(params, ByteTok(), batch_size=0)
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        harness.JaxpruneLM(params, object())


def test_loglikelihood_matches_torch(hf):
    model, params, _ = hf
    L = 48
    cases = [("It is a truth", " universally"), ("a single man ", "in possession"), ("", "Bingley"),
             (TEXT, " Mr. Bennet"), ("x", "y"), (TEXT[:30], TEXT[30:70])]
    lm = harness.JaxpruneLM(params, ByteTok(), batch_size=3, max_length=L)
    out = lm.loglikelihood([req("loglikelihood", c, x) for c, x in cases])
    tok = ByteTok()
    for (context, cont), (lp, greedy) in zip(cases, out):
        ctx = tok.encode(context) if context else [tok.bos_token_id]   # bytes: no merges across the split
        ids = (ctx + tok.encode(cont))[-(L + 1):]                       # left-truncated to L inputs
        k = len(tok.encode(context[len(context.rstrip()):] + cont))     # lm-eval scores moved trailing spaces
        ref, ref_greedy = torch_scores(model, ids)
        assert isinstance(lp, float) and isinstance(greedy, bool)
        assert lp == pytest.approx(ref[-k:].sum(), rel=1e-4, abs=1e-4), (context, cont)
        assert greedy == bool(ref_greedy[-k:].all())
    assert len(tok.encode(TEXT)) > L                                    # the truncation case is exercised


def test_is_greedy_true_and_false():
    # a model whose greedy continuation after "x" is " abc."
    params = successor_params({"x": " ", " ": "a", "a": "b", "b": "c", "c": "."})
    out = harness.loglikelihoods(params, ByteTok(), [("the x", " abc"), ("the x", " abd"), ("x x", " a"),
                                                     ("", "x")])
    assert [g for _, g in out][:3] == [True, False, True]
    for (context, cont), (lp, greedy) in zip([("the x", " abc"), ("the x", " abd")], out):
        ids = ByteTok().encode(context + cont)
        ref, ref_greedy = np_scores(params, ids)
        k = len(cont)
        assert lp == pytest.approx(ref[-k:].sum(), rel=1e-5, abs=1e-5)
        assert greedy == bool(ref_greedy[-k:].all())


def test_gated_submodel_and_input_checks():
    import jax.numpy as jnp
    params, tok = tiny_params(seed=5, num_hidden_layers=2), ByteTok()
    gates = {"heads": jnp.ones((2, 2)).at[0, 1].set(0.0), "mlp": jnp.array([1.0, 0.0])}
    reqs = [("It is a truth", " universally"), ("Mr. Bennet", " replied")]
    lm = harness.JaxpruneLM(params, tok, gates=gates, batch_size=2)
    out = lm.loglikelihood([req("loglikelihood", *r) for r in reqs])
    dense = harness.loglikelihoods(params, tok, reqs)
    for (c, x), (lp, _), (lp_dense, _) in zip(reqs, out, dense):
        ref, _ = np_scores(params, tok.encode(c + x), gates)
        assert lp == pytest.approx(ref[-len(x):].sum(), rel=1e-5) and abs(lp - lp_dense) > 1e-3
    with pytest.raises(InvalidArgumentError, match="context"):
        harness.score_pairs(params, [([], [3])])
    with pytest.raises(InvalidArgumentError, match=r"\[0, 259\)"):
        harness.score_pairs(params, [([1], [300])])
    with pytest.raises(InvalidArgumentError, match="exceeds max_length"):
        harness.score_pairs(params, [([1], [3] * 20)], max_length=16)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        harness.generate_ids(params, [[1]], 16, max_length=16)
    with pytest.raises(InvalidArgumentError, match="max_gen_toks"):
        lm.generate_until([req("generate_until", "x", {"max_gen_toks": 0})])


def test_encode_pair_follows_lm_eval():
    class Words:           # merges across the context/continuation boundary, like BPE
        bos_token_id, eos_token_id = None, 9

        def encode(self, s):
            return [len(w) for w in s.replace(" ", " _").split(" ")]

    class Template(lm_eval.api.model.TemplateLM):
        eot_token_id = 9

        def tok_encode(self, string, **kw):
            return Words().encode(string)

        def _loglikelihood_tokens(self, requests, **kw):
            return [(r[1], r[2]) for r in requests]

        loglikelihood_rolling = generate_until = None

    cases = [("a bb ", "ccc"), ("a bb", " ccc dd"), ("", "abc"), ("xy", "z")]
    expected = Template().loglikelihood([req("loglikelihood", *c) for c in cases], disable_tqdm=True)
    assert [harness.encode_pair(Words(), *c) for c in cases] == [tuple(e) for e in expected]


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for n, L in [(0, 4), (3, 4), (4, 4), (10, 4), (23, 5), (7, 1)]:
        ids = list(range(100, 100 + n))
        ref = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 7, L, 1)]
        assert harness.rolling_windows(ids, 7, L) == [(list(a), list(b)) for a, b in ref]


def test_loglikelihood_rolling(hf):
    model, params, _ = hf
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    tok = ByteTok()
    docs = [TEXT, "Mr. Bennet replied that he had not.", "x"]
    # a context longer than every document: the sum of every token's log-prob given all before it
    out = harness.JaxpruneLM(params, tok, batch_size=2, max_length=128).loglikelihood_rolling(
        [req("loglikelihood_rolling", d) for d in docs])
    for d, lp in zip(docs, out):
        ref, _ = torch_scores(model, [tok.bos_token_id] + tok.encode(d))
        assert lp == pytest.approx(ref.sum(), rel=1e-4)
    # short windows: every token predicted once, from the windows lm-eval itself builds
    L = 16
    out = harness.JaxpruneLM(params, tok, batch_size=4, max_length=L).loglikelihood_rolling(
        [req("loglikelihood_rolling", d) for d in docs])
    for d, lp in zip(docs, out):
        total = 0.0
        for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(tok.encode(d), 1, L, 1)):
            ref, _ = torch_scores(model, list(ctx) + list(pred))
            total += ref[-len(pred):].sum()
        assert lp == pytest.approx(total, rel=1e-4)


def test_generate_until_stops_at_the_stop_string():
    params = successor_params({"x": " ", " ": "a", "a": "b", "b": "c", "c": "d", "d": "e", "e": "!",
                               "!": "x", "q": "Q"})
    tok = ByteTok()
    lm = harness.JaxpruneLM(params, tok, batch_size=2)
    reqs = [req("generate_until", "the x", {"until": ["d"], "max_gen_toks": 20}),
            req("generate_until", "x", {"until": ["!"], "max_gen_toks": 3}),
            req("generate_until", "abcdefgh x", {"until": "cd", "max_gen_toks": 20}),
            req("generate_until", "the x", {"until": ["zz"], "max_gen_toks": 12})]
    out = lm.generate_until(reqs)
    assert out[:3] == [" abc", " ab", " ab"]
    assert out[3] == " abcde!x abc"                                    # 12 tokens along the chain


def test_generate_until_decodes_through_the_engine(monkeypatch):
    """lm-eval's generate_until runs the KV-cached engine's compiled loop (and nothing else decodes)."""
    from jaxprune.evaluation import text_generation
    from jaxprune.generation import engine
    calls = []
    real = engine.compile_decode

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(text_generation, "compile_decode", counting)
    params = successor_params({"x": " ", " ": "a", "a": "b", "b": "c", "c": "d"})
    out = harness.JaxpruneLM(params, ByteTok(), batch_size=2).generate_until(
        [req("generate_until", "the x", {"until": ["d"], "max_gen_toks": 20})])
    assert out == [" abc"] and calls


def test_generation_matches_independent_greedy_decoding(hf):
    model, params, _ = hf
    tok = ByteTok()
    prompts = ["It is a truth", "Mr. Bennet", "x", TEXT[:60]]
    out, seconds = harness.generate_ids(params, [tok.encode(p) for p in prompts], 20, stop_token_ids=[2],
                                        batch_size=3, chunk=8)
    assert seconds > 0
    for p, got in zip(prompts, out):
        ids, ref = tok.encode(p), []
        with torch.no_grad():
            for _ in range(20):
                nxt = int(model(torch.tensor([ids + ref])).logits[0, -1].argmax())
                if nxt == 2:
                    break
                ref.append(nxt)
        assert got == ref


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_simple_evaluate_offline(hf, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate on local tasks (multiple choice, generation, a jaxprune.evaluation.tasks export)."""
    import datasets
    from jaxprune.evaluation import tasks as jp_tasks
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    model, params, _ = hf
    tok = ByteTok()
    sentences = [s.strip() + "." for s in jp.bundled_text("prideprejudice")[2000:6000].replace("\n", " ").split(".")
                 if len(s.split()) > 3][:12]
    mc = [{"question": sentences[i], "choices": [sentences[(i + j) % 12][:40] for j in (1, 3, 5)], "label": i % 3}
          for i in range(5)]
    gen = [{"prompt": s[:30], "answer": s[30:40]} for s in sentences[5:9]]
    write_jsonl(tmp_path / "mc.jsonl", mc)
    write_jsonl(tmp_path / "gen.jsonl", gen)
    (tmp_path / "jp_mc.yaml").write_text(f"""task: jp_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tmp_path / "jp_gen.yaml").write_text(f"""task: jp_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["e"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
""")
    cont = jp_tasks.continuation_task(jp.bundled_text("northangerabbey"), n=4, n_choices=3, context_sentences=1,
                                      max_words=12, seed=3)
    jp_tasks.write_lm_eval_task(cont, str(tmp_path), "jp_next")
    lm = harness.JaxpruneLM(params, tok, batch_size=4)
    res = lm_eval.simple_evaluate(model=lm, tasks=["jp_mc", "jp_gen", "jp_next"], bootstrap_iters=0,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path),
                                                                         include_defaults=False),
                                  log_samples=True)
    r = res["results"]

    # multiple choice: acc and acc_norm from the torch model's loglikelihoods
    def choice_lls(context, choices):
        out = []
        for c in choices:
            ids = tok.encode(context) + tok.encode(" " + c)
            ref, _ = torch_scores(model, ids)
            out.append(ref[-len(tok.encode(" " + c)):].sum())
        return np.array(out)

    lls = [choice_lls(d["question"], d["choices"]) for d in mc]
    acc = np.mean([ll.argmax() == d["label"] for ll, d in zip(lls, mc)])
    acc_norm = np.mean([(ll / [len(c) for c in d["choices"]]).argmax() == d["label"] for ll, d in zip(lls, mc)])
    assert r["jp_mc"]["acc,none"] == pytest.approx(acc)
    assert r["jp_mc"]["acc_norm,none"] == pytest.approx(acc_norm)

    # generation: each response is the torch greedy continuation cut before "e"
    assert len(res["samples"]["jp_gen"]) == len(gen) and len(res["samples"]["jp_mc"]) == len(mc)
    for s in res["samples"]["jp_gen"]:
        ids, ref = tok.encode(s["doc"]["prompt"]), []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(model(torch.tensor([ids + ref])).logits[0, -1].argmax())
                if nxt == 2:
                    break
                ref.append(nxt)
        assert s["resps"][0][0] == tok.decode(ref).split("e")[0]
    assert 0.0 <= r["jp_gen"]["exact_match,none"] <= 1.0

    # the exported jaxprune.evaluation.tasks task reproduces continuation_accuracy (acc_norm = per-character)
    assert r["jp_next"]["acc_norm,none"] == pytest.approx(jp_tasks.continuation_accuracy(params, tok, cont))
    assert r["jp_next"]["acc,none"] == pytest.approx(
        jp_tasks.continuation_accuracy(params, tok, cont, normalize=None))
    assert math.isfinite(r["jp_mc"]["acc,none"])


def test_registration_is_explicit():
    """Building JaxpruneLM leaves lm-eval's registry alone; register_with_lm_eval() registers it."""
    import subprocess
    import sys
    code = ("from lm_eval.api import registry; from jaxprune.evaluation import harness; harness.JaxpruneLM\n"
            "try:\n    registry.get_model('jaxprune'); print('registered')\n"
            "except ValueError:\n    print('not registered')\n"
            "cls = harness.register_with_lm_eval(); print(registry.get_model('jaxprune') is cls)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["not", "registered", "True"]


def test_lm_eval_is_imported_lazily(monkeypatch):
    import subprocess
    import sys
    code = ("import sys, jaxprune, jaxprune.evaluation.harness, jaxprune.evaluation.tasks, jaxprune.evaluation.generation_metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'rouge_score')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    monkeypatch.delitem(sys.modules, "jaxprune.evaluation.lm_eval_model", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval.api", None)       # as if lm-eval were not installed
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxprune\[eval\]'"):
        harness.JaxpruneLM
