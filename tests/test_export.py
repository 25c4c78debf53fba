"""`python -m lm2_jax.export` both ways, checked against PyTorch and Hugging Face `transformers`.

The PyTorch side runs in one separate process (`tests/workers/torch_hf.py`) the way a user's
would: `HF_HUB_OFFLINE=1`, a private module cache, a working directory outside the checkout, no
jax imported. It loads every export made here and saves logits, memories and greedy generations,
which the tests compare with the JAX model and the JAX generator.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from lm2_jax import config as cfglib, generate as genlib, parallel
from lm2_jax.export import files, from_hf, hf, to_hf
from lm2_jax.model import decoder
from lm2_jax.train import checkpoint, loop, optimizer as optlib, state as statelib
from tests.conftest import ROOT, run_module, tiny_config

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
# The CLI-trained model (configs/tiny.py made small): memory in all blocks, the delta write
# read per segment at content keys, top-k, the convolution, the normalised bank, segments of
# 8. Its backbone starts from a Hugging Face Llama imported with --from_hf, so the import,
# `train.init_from` and the export meet here.
MODEL_FLAGS = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.memory.layers=2",
               "--config.model.memory.slots=8", "--config.model.memory.heads=2", "--config.model.memory.top_k=4",
               "--config.model.memory.segment_len=8", "--config.model.conv_width=3",
               "--config.model.memory.read_scope=segment",  # token reads allow one memory block
               "--config.model.memory.address=content"]  # slot keys: the in-process parity tests
TRAIN_FLAGS = ["--config.data.batch_size=8", "--config.train.steps=3", "--config.train.warmup_steps=1",
               "--config.train.eval_samples=8", "--config.train.eval_batch_size=8", "--config.train.checkpoint_every=3",
               # one answer per row, as before the tiny default asked more: the bf16 bound below was
               # set on those weights (with the appended questions the error read 0.054 > 0.038)
               "--config.data.extra_questions=0", "--config.train.loss_positions=4"]
PROMPTS = [list(range(40, 51)), [7, 300, 9]]  # 11 and 3 tokens; 14 new tokens cross two boundaries of 8
NEW_TOKENS = 14
EOS = 2


_cli = run_module


def _hf_llama(vocab=8192, layers=2, tied=True, seed=0):
    torch.manual_seed(seed)
    m = cfglib.model_defaults()
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = vocab, 32, layers, 4, 2, 64
    m.tie_embeddings = tied
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf.hf_config(m))).float().eval()
    with torch.no_grad():  # norms start at 1 in HF: move them so the import of the scales is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _few_steps_workdir(workdir, config, steps=3):
    """Train `config` a few real steps on random rows in-process and write it as a workdir."""
    mesh = parallel.make_mesh(config.mesh)
    rules = config.mesh.rules
    tx = optlib.make_optimizer(config.train)
    train_step, _, _ = loop.compile_steps(config, mesh, rules, tx)
    state = statelib.init_state(config, mesh, rules, tx)
    B, T, V = config.data.batch_size, config.data.seq_len, config.model.vocab_size
    rng = np.random.default_rng(1)
    for _ in range(steps):
        batch = {"tokens": rng.integers(3, V, (B, T)).astype(np.int32), "loss_mask": np.ones((B, T), np.int32),
                 "doc_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
        state, _ = train_step(state, parallel.global_batch(batch, mesh, rules))
    checkpoint.write_state(workdir, state, config)
    return workdir


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every export of this file, and what PyTorch computed from each."""
    root = tmp_path_factory.mktemp("export")
    d = {"root": root}
    llama = _hf_llama()
    llama.save_pretrained(root / "llama", max_shard_size="200KB")
    d["llama"] = llama
    proc = _cli("lm2_jax.export", f"--from_hf={root / 'llama'}", "--config=configs/tiny.py",
                f"--workdir={root / 'init'}", *MODEL_FLAGS)
    d["import_stdout"] = proc.stdout
    proc = _cli("lm2_jax.train", f"--workdir={root / 'trained'}", f"--config.train.init_from={root / 'init'}",
                *MODEL_FLAGS, *TRAIN_FLAGS)
    d["train_stdout"] = proc.stdout
    proc = _cli("lm2_jax.export", f"--workdir={root / 'trained'}", f"--out={root / 'hf_trained'}",
                "--max_shard_size=100KB")
    d["export_stdout"] = proc.stdout
    to_hf.export(str(root / "trained"), str(root / "hf_bf16"), dtype="bfloat16", progress=False)

    # L_m = 1 of 2 with the paper's candidate, a learned M_0, untied embeddings, the other placement
    # and routing; RMT; and a vanilla Llama. Each trained three steps on random rows.
    one = tiny_config(vocab_size=8192, layers=1, segment_len=8, top_k=2, init="learned", placement="after_attention",
                      routing="mass")
    one.model.tie_embeddings = False
    rmt = tiny_config(vocab_size=8192, layers=0, segment_len=8, slots=4, init="learned")
    rmt.model.kind, rmt.model.conv_width, rmt.model.tie_embeddings = "rmt", 2, False  # untied: varied greedy tokens
    vanilla = tiny_config(vocab_size=8192)
    vanilla.model.tie_embeddings = False
    for name, config in (("one", one), ("rmt", rmt), ("vanilla", vanilla)):
        config.data.seq_len, config.data.batch_size = 24, 4
        cfglib.validate(config)
        _few_steps_workdir(str(root / name), config)
        to_hf.export(str(root / name), str(root / f"hf_{name}"), progress=False)

    tokens = np.random.default_rng(0).integers(3, 8192, (2, 29))  # 4 segments of 8
    np.save(root / "tokens.npy", tokens)
    d["tokens"] = tokens
    spec = [{"dir": str(root / f"hf_{n}"), "loader": "llama" if n == "vanilla" else "auto",
             "tokens": str(root / "tokens.npy"), "out": str(root / f"torch_{n}.npz"),
             **({} if n in ("vanilla", "bf16") else {"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS}),
             "left_padded_batch": n in ("trained", "one")} for n in ("trained", "bf16", "one", "rmt", "vanilla")]
    with open(root / "spec.json", "w") as f:
        json.dump(spec, f)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "PYTHONPATH": ""}
    worker = os.path.join(ROOT, "tests", "workers", "torch_hf.py")
    proc = subprocess.run([sys.executable, worker, str(root / "spec.json")], cwd=str(root), capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    d["torch"] = {n: dict(np.load(root / f"torch_{n}.npz")) for n in ("trained", "bf16", "one", "rmt", "vanilla")}
    return d


def _jax(made, name):
    config, params, _ = checkpoint.load_params(str(made["root"] / name))
    logits, mem = decoder.forward(config.model, params, made["tokens"])
    return config, params, np.asarray(logits), np.asarray(mem)


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
@pytest.mark.parametrize("name", ["trained", "one", "rmt"])
def test_pytorch_logits_and_memory_equal_jax(made, name):
    config, params, logits, mem = _jax(made, name)
    got = made["torch"][name]
    assert str(got["class"]).startswith("transformers_modules.") and str(got["class"]).endswith("LM2ForCausalLM")
    np.testing.assert_allclose(got["logits"], logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["memory"], mem, atol=1e-5, rtol=0)
    m0 = np.asarray(decoder.initial_memory(config.model, params, 2))
    assert np.abs(logits).max() > 0.1 and np.abs(mem - m0).max() > 1e-3  # the memory moved


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_trained_model_started_from_the_imported_llama(made):
    assert "params from" in made["train_stdout"] and "init/checkpoints/0" in made["train_stdout"]
    assert "arrays from" in made["import_stdout"] and "freshly initialised" in made["import_stdout"]
    _, init, _ = checkpoint.load_params(str(made["root"] / "init"))
    sd = made["llama"].state_dict()
    np.testing.assert_array_equal(np.asarray(init["embed"]), sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(init["mem_blocks"]["mlp"]["down"][1]),
                                  sd["model.layers.1.mlp.down_proj.weight"].numpy().T)
    # the memory and the convolution are train.seed's fresh init (to float rounding: the CLI compiled it
    # with XLA's optimisations, this test session without)
    fresh = statelib.init_state(checkpoint.read_config(str(made["root"] / "init"))).params
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    jax.tree.map(close, init["mem_blocks"]["memory"], fresh["mem_blocks"]["memory"])
    jax.tree.map(close, init["mem_blocks"]["conv"], fresh["mem_blocks"]["conv"])


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
@pytest.mark.parametrize("name", ["trained", "one", "rmt"])
def test_pytorch_generate_equals_jax_generator(made, name):
    config, params, _, _ = _jax(made, name)
    want = genlib.generate(config.model, params, [np.asarray(p) for p in PROMPTS], NEW_TOKENS, eos_id=EOS).tokens
    got = made["torch"][name]
    for i, w in enumerate(want):
        g = got[f"gen_{i}"]
        stop = np.flatnonzero(g == EOS)
        g = g[:stop[0] + 1] if len(stop) else g
        np.testing.assert_array_equal(g, w)
        if name in ("trained", "one"):  # a left-padded batch generates what each row does alone
            np.testing.assert_array_equal(got[f"batch_{i}"][:len(w)], w)
    assert len(PROMPTS[0]) + len(want[0]) > 2 * config.model.memory.segment_len  # two boundaries crossed
    if name != "trained":
        assert len(set(want[0].tolist())) >= 3  # not one token repeated


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_vanilla_export_is_a_plain_llama(made):
    _, _, logits, _ = _jax(made, "vanilla")
    folder = made["root"] / "hf_vanilla"
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and not (folder / "modeling_lm2.py").exists()
    got = made["torch"]["vanilla"]
    assert str(got["class"]) == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    np.testing.assert_allclose(got["logits"], logits, atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.decode(tok.encode("Mary went to the kitchen.", add_special_tokens=False)) == "Mary went to the kitchen."


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_sharded_export_index_and_files(made):
    folder = made["root"] / "hf_trained"
    with open(folder / files.INDEX) as f:
        index = json.load(f)
    config = checkpoint.read_config(str(made["root"] / "trained"))
    assert set(index["weight_map"]) == set(hf.expected_names(config.model))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
    params = checkpoint.load_params(str(made["root"] / "trained"))[1]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in hf.params_to_hf(config.model, params).values())
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "modeling_lm2.py",
            "configuration_lm2.py"} <= set(os.listdir(folder))
    with open(folder / "config.json") as f:
        assert json.load(f)["auto_map"]["AutoModelForCausalLM"] == "modeling_lm2.LM2ForCausalLM"
    assert "load with AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)" in made["export_stdout"]


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_bfloat16_export_halves_the_files_and_stays_close(made):
    size = lambda d: sum(os.path.getsize(made["root"] / d / f) for f in os.listdir(made["root"] / d)
                         if f.endswith(".safetensors"))
    ratio = size("hf_bf16") / size("hf_trained")
    assert 0.49 < ratio < 0.51, ratio
    _, _, logits, _ = _jax(made, "trained")
    err = np.abs(made["torch"]["bf16"]["logits"] - logits).max()
    assert 0 < err < 0.05 * np.abs(logits).max(), err  # bf16 weights: ~3 significant digits


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_hf_llama_imports_with_logits_equal_and_round_trips_exactly(made, tmp_path):
    llama = made["llama"]
    config = tiny_config(vocab_size=8192)
    config.model.n_layers = 2
    folder = str(made["root"] / "llama")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 2
    from_hf.import_hf(folder, config, str(tmp_path / "run"), progress=False)
    _, params, _ = checkpoint.load_params(str(tmp_path / "run"))
    tokens = made["tokens"]
    with torch.no_grad():
        ref = llama(torch.as_tensor(tokens)).logits.numpy()
    ours, _ = decoder.forward(config.model, params, tokens)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    # JAX -> HF -> JAX: export, import the export, the params are bit-identical
    to_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    from_hf.import_hf(str(tmp_path / "hf"), config, str(tmp_path / "back"), progress=False)
    _, back, _ = checkpoint.load_params(str(tmp_path / "back"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)
    # a tied Llama starts an untied model: its lm_head is the embedding
    untied = tiny_config(vocab_size=8192)
    untied.model.tie_embeddings = False
    from_hf.import_hf(folder, untied, str(tmp_path / "untied"), progress=False)
    _, p2, _ = checkpoint.load_params(str(tmp_path / "untied"))
    np.testing.assert_array_equal(np.asarray(p2["lm_head"]), llama.state_dict()["model.embed_tokens.weight"].numpy().T)
    # and the export's tensors are the Llama's own, bit for bit
    state = files.HFFolder(str(tmp_path / "hf"))
    sd = {n: t for n, t in llama.state_dict().items() if n != "lm_head.weight"}  # tied: the embedding
    assert sorted(state.keys()) == sorted(sd)
    for name, t in sd.items():
        np.testing.assert_array_equal(state[name], t.numpy(), err_msg=name)


@pytest.mark.slow
def test_checkpoint_from_the_2x2x2_mesh_exports_the_same_files(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tests.workers.mesh_worker", "export", str(tmp_path)], cwd=ROOT,
                          text=True, capture_output=True, timeout=600, env={**os.environ, **EIGHT})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert result["same_params"] and result["leaves_split"] >= result["leaves"] // 2  # really sharded
    for name in ("mesh", "single"):
        to_hf.export(str(tmp_path / name), str(tmp_path / f"hf_{name}"), max_shard_size="50KB", progress=False)
    names = sorted(os.listdir(tmp_path / "hf_mesh"))
    assert names == sorted(os.listdir(tmp_path / "hf_single")) and files.INDEX in names
    for n in names:
        assert (tmp_path / "hf_mesh" / n).read_bytes() == (tmp_path / "hf_single" / n).read_bytes(), n


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_bad_inputs_fail_with_one_clear_message(made, tmp_path):
    proc = _cli("lm2_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no config.json there" in proc.stderr
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with open(tmp_path / "empty" / "config.json", "w") as f:
        f.write(checkpoint.read_config(str(made["root"] / "one")).to_json())
    with pytest.raises(Exception, match=r"no checkpoint in .*empty/checkpoints"):
        to_hf.export(str(tmp_path / "empty"), str(tmp_path / "x"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match=r"--out=.*full exists and is not empty; pass --overwrite"):
        to_hf.export(str(made["root"] / "one"), str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(Exception, match=r"--max_shard_size=5 parsecs"):
        to_hf.export(str(made["root"] / "one"), str(tmp_path / "y"), max_shard_size="5 parsecs")

    init = str(made["root"] / "init")  # an import is a starting point, not a run to resume
    with pytest.raises(Exception, match=r"holds imported params .* --config.train.init_from="):
        loop.train(checkpoint.read_config(init), init)

    import shutil

    config = tiny_config(vocab_size=8192)
    broken = tmp_path / "broken"
    shutil.copytree(made["root"] / "llama", broken)
    shard = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[1]
    os.remove(broken / shard)
    with pytest.raises(Exception, match=rf"shard {shard} listed in model.safetensors.index.json is missing"):
        from_hf.import_hf(str(broken), config, str(tmp_path / "a"))
    wrong_vocab = tiny_config(vocab_size=8200)
    with pytest.raises(Exception, match=r"tensor model.embed_tokens.weight has shape \(8192, 32\), --config expects "
                                        r"\(8200, 32\)"):
        from_hf.import_hf(str(made["root"] / "llama"), wrong_vocab, str(tmp_path / "b"))
    mistral = tmp_path / "mistral"
    shutil.copytree(made["root"] / "llama", mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    with pytest.raises(Exception, match=r"model_type='mistral'; --from_hf reads Llama folders"):
        from_hf.import_hf(str(mistral), config, str(tmp_path / "c"))
    # a folder whose config says 2 layers but lacks layer 1, and one whose embedding has another shape
    folder = files.HFFolder(str(made["root"] / "llama"))
    like = checkpoint.abstract_params(config)
    state = {n: folder[n] for n in folder.keys() if not n.startswith("model.layers.1.")}
    lacking = _fake_folder(folder, state)
    with pytest.raises(Exception, match=r"missing tensor model.layers.1.input_layernorm.weight \(--config expects"):
        from_hf.check_tensors(lacking, config.model, like)
    state = {n: folder[n] for n in folder.keys()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:, :16]
    with pytest.raises(Exception, match=r"tensor model.embed_tokens.weight has shape \(8192, 16\), --config expects "
                                        r"\(8192, 32\)"):
        from_hf.check_tensors(_fake_folder(folder, state), config.model, like)


def _fake_folder(folder, state):
    class Fake:
        directory = folder.directory
        __contains__ = state.__contains__
        keys = state.keys
        __getitem__ = state.__getitem__
        shape = staticmethod(lambda n: tuple(state[n].shape))
    return Fake()


@pytest.mark.slow
@pytest.mark.xdist_group("export")  # one worker builds the exports (see pyproject addopts)
def test_init_from_a_different_model_names_the_leaf(made):
    config = tiny_config(vocab_size=8192, layers=1)
    like = checkpoint.abstract_params(config)
    with pytest.raises(cfglib.ConfigError, match=r"train.init_from.*its params\[.*\] is (absent|shape)"):
        loop.init_params_from(config, str(made["root"] / "one"), like)


def test_pytorch_model_file_imports_only_torch_and_transformers():
    src = open(os.path.join(ROOT, "lm2_jax", "export", "modeling_lm2.py")).read()
    imports = {ln.split()[1].split(".")[0] for ln in src.splitlines() if ln.startswith(("import ", "from "))}
    assert imports <= {"__future__", "math", "dataclasses", "torch", "transformers", ""}, imports


def test_llama_3p2_1b_config_fits_the_paper_config():
    """configs/lm2_1p7b.py accepts the published Llama-3.2-1B config.json (its values, as shipped
    with the older rope_scaling spelling) and expects exactly its 146 tensors for the backbone."""
    from tests.conftest import shipped_config

    config = shipped_config("lm2_1p7b")
    published = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
                 "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    from_hf.check_config(published, config.model, "Llama-3.2-1B")
    backbone = [n for n in hf.expected_names(config.model) if from_hf._backbone(n)]
    assert len(backbone) == 146 and "lm_head.weight" not in backbone
    with pytest.raises(Exception, match=r"RoPE factor=8.0 but --config"):
        from_hf.check_config(dict(published, rope_scaling=dict(published["rope_scaling"], factor=8.0)),
                             config.model, "x")


@pytest.mark.parametrize("variant", ["lm2_all", "lm2_one", "lm2_delta", "lm2_token_scope", "rmt", "vanilla_segmented"])
def test_pytorch_module_matches_jax_in_process(variant):
    """The PyTorch model file itself (imported here, no export) on perturbed random params, every
    option on: logits and memory to 1e-5, and a left-padded row computed as if alone."""
    from lm2_jax.export.configuration_lm2 import LM2Config
    from lm2_jax.export.modeling_lm2 import LM2ForCausalLM
    from tests.conftest import tiny_model

    if variant == "lm2_all":
        m = tiny_model(layers=2, segment_len=8, top_k=3, write_candidate="tokens", normalize_bank=True)
    elif variant == "lm2_one":
        m = tiny_model(layers=1, segment_len=8, top_k=2, init="learned", placement="after_attention", routing="mass")
        m.conv_width, m.tie_embeddings = 3, False
    elif variant == "lm2_delta":
        m = tiny_model(layers=2, segment_len=8, write_candidate="tokens", normalize_bank=True, write_rule="delta")
        m.conv_width = 3
    elif variant == "lm2_token_scope":
        m = tiny_model(layers=1, segment_len=8, top_k=3, write_candidate="tokens", normalize_bank=True,
                       write_rule="delta", address="slots", read_scope="token")
        m.conv_width = 3
    elif variant == "rmt":
        m = tiny_model(layers=0, segment_len=8, slots=4, init="learned")
        m.kind, m.conv_width = "rmt", 2
    else:  # no memory, but segments and the convolution: not a Llama, so it ships the LM2 code
        m = tiny_model(layers=0, segment_len=8)
        m.conv_width = 2
        assert not hf.plain_llama(m)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(np.float32),
                          nn.meta.unbox(decoder.init_params(m, jax.random.key(1))))
    tokens = rng.integers(0, m.vocab_size, (2, 27))
    logits, mem = decoder.forward(m, params, tokens)
    model = LM2ForCausalLM(LM2Config(**hf.lm2_config(m))).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in hf.params_to_hf(m, params).items()}, strict=True)
    with torch.no_grad():
        out = model(torch.as_tensor(tokens))
        padded = torch.cat([torch.zeros((2, 5), dtype=torch.long), torch.as_tensor(tokens)], 1)
        mask = torch.cat([torch.zeros((2, 5), dtype=torch.long), torch.ones((2, 27), dtype=torch.long)], 1)
        left = model(padded, attention_mask=mask)
    np.testing.assert_allclose(out.logits.numpy(), np.asarray(logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.memory.numpy(), np.asarray(mem), atol=1e-5, rtol=0)
    np.testing.assert_allclose(left.logits[:, 5:].numpy(), out.logits.numpy(), atol=1e-6, rtol=0)
