"""SEAL: the layer, key handling, release as plain LoRA, verification statistics, attacks, bad input."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import build, inputs, output
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import save_file
from scipy import stats

from peft_ctrl import SealConfig
from peft_ctrl.seal.claim import read_claim
from peft_ctrl.seal.io import LoraFactors, read_adapter, write_lora
from peft_ctrl.seal.keys import KEY_ENV, initial_a, key_schedule, passport
from peft_ctrl.seal.release import release
from peft_ctrl.seal.verify import Suspect, verify_key, verify_owner, verify_passport
from peft_ctrl_app.cli import main as cli
from peft_ctrl_app.forensics import attacks

KEY = "owner-key-0123456789abcdef"
TARGETS = ["q_proj", "v_proj", "down_proj"]
R = 16  # the released adapter's rank: 2 layers x 3 modules x 16 = 96 passport columns, enough for p < 2^-64


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def sealed_model(key=KEY, **kw):
    return get_peft_model(build("llama"), SealConfig(**{"r": 4, "target_modules": TARGETS, "key": key, **kw}))


def train(model, steps=30, lr=3e-2, seed=0):
    """A short AdamW run that moves A's entries a lot (as real fine-tuning does)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = torch.randint(2, 60, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def lora_factors(model):
    return LoraFactors.from_model(model).factors


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A trained SEAL adapter, its release and proof."""
    root = tmp_path_factory.mktemp("seal")
    model = train(sealed_model(r=R))
    model.save_pretrained(root / "sealed")
    claim = release(root / "sealed", root / "release", root / "proof.safetensors", key=KEY)
    (root / "published.txt").write_text(claim.digest())  # what the owner published at release
    return root


def published(root) -> str:
    return (root / "published.txt").read_text()


def test_registered_and_forward_is_w_plus_s_b_c_a():
    assert PeftType("SEAL") is PeftType.SEAL
    model = sealed_model(init_weights=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    A, B = layer.seal_A["default"].weight, layer.seal_B["default"].weight
    schedule = model.peft_config["default"].schedule
    modules = model.base_model.model.named_modules()
    structure = [(n, m.out_features, m.in_features, 4) for n, m in modules if n.endswith(tuple(TARGETS))]
    assert len(structure) == 6 and schedule == key_schedule(structure)
    C = passport(KEY.encode(), schedule, "model.layers.0.self_attn.q_proj", 4).float()
    expected = layer.base_layer(x) + (8 / 4) * x @ (B @ C @ A).T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(A, initial_a(KEY.encode(), schedule, "model.layers.0.self_attn.q_proj", 4, 32).float())
    assert not C.requires_grad and all("passport" not in n for n, _ in model.named_parameters())


def test_default_init_is_the_base_model_and_merge_matches_forward():
    x = inputs("llama")
    base = output(build("llama"), x)
    torch.testing.assert_close(output(sealed_model(), x), base)
    model = sealed_model(init_weights=False)
    adapted = output(model, x)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(output(model.merge_and_unload(), x), adapted, atol=1e-5, rtol=1e-5)


def test_key_is_never_in_the_config_and_save_load_needs_it(tmp_path, monkeypatch):
    config = SealConfig(r=4, target_modules=TARGETS, key=KEY)
    assert KEY not in repr(config) and KEY not in json.dumps(config.to_dict(), default=str)
    model = get_peft_model(build("llama"), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SEAL" and len(saved["commitment"]) == 64 and "key" not in saved
    x = inputs("llama")
    with pytest.raises(ValueError, match=KEY_ENV):
        PeftModel.from_pretrained(build("llama"), tmp_path)
    monkeypatch.setenv(KEY_ENV, "another-key-0123456789")
    with pytest.raises(ValueError, match="does not match the commitment"):
        PeftModel.from_pretrained(build("llama"), tmp_path)
    monkeypatch.setenv(KEY_ENV, KEY)
    torch.testing.assert_close(output(PeftModel.from_pretrained(build("llama"), tmp_path), x), output(model, x))


def test_release_is_plain_lora_that_stock_peft_loads_alone(released, monkeypatch):
    sealed, plain = read_adapter(released / "sealed", expect=("SEAL",)), read_adapter(released / "release")
    assert plain.config["peft_type"] == "LORA"
    for module, (B, A) in sealed.factors.items():
        C = passport(KEY.encode(), sealed.config["schedule"], module, R)
        Bp, Ap = plain.factors[module]
        torch.testing.assert_close(Bp.double() @ Ap.double(), B.double() @ C @ A.double(), atol=1e-6, rtol=1e-5)
    x = inputs("llama")
    torch.save({"input_ids": x["input_ids"]}, released / "x.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
from models import build
from peft import PeftModel
model = PeftModel.from_pretrained(build("llama"), {str(released / "release")!r})
assert not any(name.startswith("peft_ctrl") for name in sys.modules), "peft_ctrl was imported"
x = torch.load({str(released / "x.pt")!r})
model.eval()
torch.save(model(**x).logits, {str(released / "stock.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    monkeypatch.setenv(KEY_ENV, KEY)
    sealed_model_ = PeftModel.from_pretrained(build("llama"), released / "sealed")
    torch.testing.assert_close(torch.load(released / "stock.pt"), output(sealed_model_, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [4, 2])
def test_row_space_of_factors_matches_the_dense_product(rank):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(40, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 30, generator=g, dtype=torch.float64)
    B[:, rank:] = 0  # a pruned or rank-deficient adapter
    from_factors = Suspect(factors={"m": (B, A)}).row_space("m", 4)
    from_dense = Suspect(deltas={"m": B @ A}).row_space("m", 4)
    assert from_factors.shape == from_dense.shape == (30, rank)
    torch.testing.assert_close(from_factors @ from_factors.T, from_dense @ from_dense.T)
    C = torch.randn(4, 4, generator=g, dtype=torch.float64)
    B0, A0 = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randn(4, 30, generator=g, dtype=torch.float64)
    core = Suspect(factors={"m": (B0 @ C, A0)}).core("m", B0, A0)
    torch.testing.assert_close(core, C)
    torch.testing.assert_close(Suspect(deltas={"m": B0 @ C @ A0}).core("m", B0, A0), C)


def test_owner_and_key_verification_pass_and_survive_product_preserving_attacks(released):
    plain = read_adapter(released / "release")
    proof = released / "proof.safetensors"
    for attacked in (plain, attacks.obfuscate(plain), attacks.permute(plain), attacks.refactorize(plain)):
        suspect = Suspect.from_adapter(attacked)
        owner = verify_owner(suspect, proof, published(released), key=KEY)
        key_only = verify_key(suspect, key=KEY)
        assert owner.verified and key_only.verified, (owner, key_only)
        assert owner.threshold == 2.0**-64 and owner.security_bits > 64
        assert owner.components["passport"]["statistic"] > 0.99
    base = dict(build("llama").state_dict())
    merged = Suspect.from_merged(attacks.merge(plain, base), base)
    assert verify_key(merged, key=KEY, r=R).verified
    assert verify_owner(merged, proof, released / "release" / "seal_claim.json", key=KEY).verified


def test_forged_key_claims_and_unrelated_keys_fail(released, tmp_path):
    from peft_ctrl.seal.io import write_proof

    plain = read_adapter(released / "release")
    suspect = Suspect.from_adapter(plain)
    forged_key = "forger-key-0123456789abcdef"
    proof = attacks.forge_proof(plain, forged_key)
    write_proof(tmp_path / "forged.safetensors", proof)
    # Against the owner's published digest the forged claim gets no verdict at all.
    with pytest.raises(ValueError, match="does not match the published commitment"):
        verify_owner(suspect, tmp_path / "forged.safetensors", published(released), key=forged_key)
    # Had the forger published a digest of their own, the statistics reject it.
    forged = verify_owner(suspect, tmp_path / "forged.safetensors", attacks.claim_of(proof).digest(), key=forged_key)
    alone = verify_passport(suspect, tmp_path / "forged.safetensors", forged_key.encode(), 2.0**-64)
    assert alone.verified, "the forgery fools the passport test alone by construction"
    assert not forged.verified and forged.p_value > 0.01
    assert not verify_key(suspect, key="unrelated-key-0123456789").verified


def assert_at_most_nominal(p, what):
    """Valid p-values: at most a fraction a of the trials under a, for every a (binomial slack of 3 sd)."""
    for a in (0.01, 0.05, 0.1, 0.2, 0.5):
        assert (p <= a).mean() <= a + 3 * (a / len(p)) ** 0.5, (what, a)


def assert_valid_null(results):
    """Under the null the pairing by name is exactly uniform; the pairing by structure (the best pairing's p
    times the number of pairings) and the verdict (twice the smaller) are never below their nominal rate."""
    p = {
        pairing: np.array([10 ** r.components[pairing]["log10_p"] for r in results if r.components[pairing]["rows"]])
        for pairing in ("by_name", "by_structure")
    }
    assert len(p["by_name"]) >= 50 and stats.kstest(p["by_name"], "uniform").pvalue > 1e-3
    assert len(p["by_structure"]) >= 50
    assert_at_most_nominal(p["by_structure"], "by_structure")
    verdicts = np.array([r.p_value for r in results])
    assert_at_most_nominal(verdicts, "verdict")
    assert (verdicts < 1e-6).sum() == 0


def test_the_structure_pairing_is_exact_where_there_is_one_pairing(released):
    """With one suspect module per shape there is one pairing to choose from: the structure test's p is then
    Fisher's p of every key row, exactly uniform under the null (400 unrelated keys), whatever names the claim
    uses; with two modules per shape it is the best of 8 pairings times 8, valid and within log10 8 of it."""
    plain = read_adapter(released / "release")
    layer0 = {m: f for m, f in plain.factors.items() if ".layers.0." in m}
    suspect = Suspect.from_adapter(LoraFactors(layer0, plain.scaling))
    structure = tuple((f"renamed.{i}", *suspect.shape(m), R) for i, m in enumerate(sorted(layer0)))
    from peft_ctrl.seal.verify import _key_test

    single = [_key_test(suspect, f"null-key-{i:04d}-0123456789".encode(), structure) for i in range(400)]
    assert {v.by_structure.log_choices for v in single} == {0.0}
    p = np.array([math.exp(v.by_structure.log_p()) for v in single])
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    full = _key_test(Suspect.from_adapter(plain), b"null-key-0000-0123456789", structure)
    assert math.isclose(full.by_structure.log_choices, math.log(8))


def test_key_only_p_values_are_valid_under_the_null(released):
    """The null: 400 unrelated keys against one adapter."""
    suspect = Suspect.from_adapter(read_adapter(released / "release"))
    assert_valid_null([verify_key(suspect, key=f"null-key-{i:04d}-0123456789") for i in range(400)])


def test_key_rows_depend_on_the_whole_structure():
    """Finding 1 of the SEAL issue: rows derived from (key, module name) alone let a forger search names one module
    at a time. Every key row now depends on the whole structure: change one module's name or rank and every
    module's rows change."""
    structure = [(f"layers.{i}.q", 32, 32, 8) for i in range(3)]
    key = KEY.encode()

    def rows(s):
        return initial_a(key, key_schedule(s), "layers.0.q", 8, 32)

    assert torch.equal(rows(structure), rows(list(reversed(structure))))  # the order of listing does not matter
    for changed in ([*structure[:2], ("layers.2.k", 32, 32, 8)], [*structure[:2], ("layers.2.q", 32, 32, 4)]):
        assert not torch.allclose(rows(structure), rows(changed))
    assert not torch.allclose(rows(structure), rows(structure[:2]))  # a subset is another structure


def test_a_claimant_choosing_names_ranks_subsets_and_keys_gets_a_valid_null(released):
    """Findings 1 and 2: 300 claims over the owner's release, each with a key, module names (permuted, prefixed or
    invented), ranks (1 to 16 per module) and a module subset of the claimant's choosing, give p-values that are
    never below their nominal rate: a whole-claim search needs about 1/p tries per verdict."""
    from peft_ctrl.seal.claim import Claim, weights_sha256
    from peft_ctrl.seal.keys import commitment

    plain = read_adapter(released / "release")
    suspect = Suspect.from_adapter(plain)
    modules = sorted(plain.factors)
    rng = np.random.default_rng(0)
    results = []
    for i in range(300):
        key = f"forger-{i:05d}-0123456789abcdef"
        chosen = sorted(rng.choice(len(modules), size=rng.integers(1, len(modules) + 1), replace=False))
        names = [modules[j] for j in rng.permutation(chosen)] if i % 3 == 0 else [f"x{i}.{j}" for j in chosen]
        structure = tuple(
            (name, *suspect.shape(modules[j]), int(rng.integers(1, R + 1)))
            for name, j in zip(names, chosen, strict=True)
        )
        salt = f"{i:032x}"
        claim = Claim(commitment(key.encode(), salt), salt, structure, weights_sha256(plain.factors, plain.scaling))
        results.append(verify_key(suspect, key=key, claim=claim))
    assert_valid_null(results)


FORGER = "forger-key-0123456789abcdef"


def forged_digest(fields: dict) -> str:
    """The digest a forger would publish for claim fields he wrote himself (no Claim object involved)."""
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_a_claim_that_repeats_modules_gets_no_verdict(released, tmp_path):
    """Item 1 of the SEAL forgery issue: a stranger's claim over a release that lists every module 100 times. The
    key rows of a module come from its name, so before the fix the by-name test counted the same rows 100 times
    (3,200 rows for this release's 32) and Fisher's method took them as independent: VERIFIED for some forger keys
    (issue: 1 of 20 keys at K = 100, 2 of 3 at K = 1000). Now such a claim is refused wherever it enters: in the
    proof (owner mode), in a record file (key mode) and at the test itself."""
    from peft_ctrl.seal.verify import _key_test

    plain = read_adapter(released / "release")
    suspect = Suspect.from_adapter(plain)
    proof = attacks.forge_proof(plain, FORGER)
    fields = {**proof.claim, "structure": [row for row in proof.claim["structure"] for _ in range(100)]}
    proof.claim = fields
    with pytest.raises(ValueError, match="more than once"):
        verify_owner(suspect, proof, forged_digest(fields), key=FORGER)
    record = tmp_path / "seal_claim.json"
    record.write_text(json.dumps({**fields, "claim": forged_digest(fields)}))
    with pytest.raises(ValueError, match="more than once"):
        read_claim(record)
    structure = tuple(tuple(row) for row in fields["structure"])
    with pytest.raises(ValueError, match="more than once"):
        _key_test(suspect, FORGER.encode(), structure)
    # The same name with another shape or rank is the same module listed twice, too.
    first = list(proof.claim["structure"][0])
    with pytest.raises(ValueError, match="more than once"):
        _key_test(suspect, FORGER.encode(), (tuple(first), (first[0], first[1], first[2], first[3] - 1)))


def test_a_claim_must_describe_the_proof_it_comes_with(released):
    """A claim whose structure (names, shapes, ranks) is not the proof's own factors' is refused: the claim binds
    the adapter it was released from. A forger who claims a larger rank pads his factors to it (forge_proof does),
    which describes them again, and is then judged by the key-only test: not verified."""
    plain = read_adapter(released / "release")
    suspect = Suspect.from_adapter(plain)
    proof = attacks.forge_proof(plain, FORGER)
    fields = {**proof.claim, "structure": [[m, o, i, r + 4] for m, o, i, r in proof.claim["structure"]]}
    proof.claim = fields
    with pytest.raises(ValueError, match="other modules, shapes or ranks than the proof's own factors"):
        verify_owner(suspect, proof, forged_digest(fields), key=FORGER)
    padded = attacks.forge_proof(plain, FORGER, rank=R + 4)
    assert {r for *_, r in attacks.claim_of(padded).structure} == {R + 4}
    result = verify_owner(suspect, padded, attacks.claim_of(padded).digest(), key=FORGER)
    assert not result.verified and result.p_value > 1e-3
    with pytest.raises(ValueError, match="pads, never cuts"):
        attacks.forge_proof(plain, FORGER, rank=R - 1)


def test_hostile_claims_keep_an_exact_null(released):
    """Item 2 of the SEAL forgery issue: a seeded search over hostile claims (supersets, reorderings, mixed ranks,
    duplicates, a forger key each) against the owner's release. Claims with duplicates are refused; the others'
    p-values are valid (each pairing's exactly uniform, the verdict's never below its nominal rate), none uses a
    suspect module twice or more rows than it claims, and the smallest p over the N claims behaves like the
    minimum of N uniform p-values (N * min p is Exp(1): below 1e-3 with probability 1e-3) and is far above 2^-64.
    The benchmark runs the same search at scale (benchmarks/seal_robustness.py, "Hostile claims")."""
    plain = read_adapter(released / "release")
    suspect = Suspect.from_adapter(plain)
    sha = attacks.claim_of(attacks.forge_proof(plain, FORGER)).weights_sha256
    results, refused = [], 0
    shapes = {m: suspect.shape(m) for m in suspect.modules()}
    for i, (claim, key) in enumerate(attacks.hostile_claims(shapes, sha, 240, seed=0, max_rank=2 * R)):
        if claim is None:
            assert i % 4 == 3
            refused += 1
            continue
        result = verify_key(suspect, key=key, claim=claim, threshold=2.0**-64)
        assert not result.verified
        for pairing in ("by_name", "by_structure"):
            used = result.components[pairing]
            assert used["modules"] <= len(suspect.modules()) and used["rows"] <= sum(r for *_, r in claim.structure)
        results.append(result)
    assert refused == 60
    assert_valid_null(results)
    smallest = min(r.p_value for r in results)
    assert len(results) * smallest > 1e-3 and smallest > 2.0**-64


def test_the_order_of_a_claims_entries_is_not_the_claimants_to_choose(released):
    """A claim is normalised to module order before it is hashed or tested: any listing of the same entries is
    the same claim, with the same digest and the same verdict."""
    from peft_ctrl.seal.claim import Claim

    record = read_claim(released / "release" / "seal_claim.json")
    suspect = Suspect.from_adapter(read_adapter(released / "release"))
    shuffled = Claim(record.key_commitment, record.salt, tuple(reversed(record.structure)), record.weights_sha256)
    assert shuffled == record and shuffled.digest() == published(released)
    assert verify_key(suspect, key=KEY, claim=shuffled).log10_p == verify_key(suspect, key=KEY, claim=record).log10_p


def test_passport_p_values_are_uniform_enough_under_the_null(released):
    """Unrelated adapters (plain LoRA, other seeds) against the owner's proof: binomial null, no false positive."""
    proof = released / "proof.safetensors"
    p = []
    for seed in range(60):
        base = build("llama")
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=R, target_modules=TARGETS, init_lora_weights=False))
        result = verify_passport(Suspect(factors=lora_factors(model)), proof, KEY.encode(), 1e-6)
        p.append(result.p_value)
    p = np.array(p)
    assert (p < 1e-6).sum() == 0 and (p < 0.01).mean() <= 0.05 and 0.3 < p.mean() < 0.7


def test_bad_input_gets_clear_errors_and_writes_nothing(released, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="use at least 16"):
        SealConfig(r=4, key="short")
    with pytest.raises(ValueError, match="SealConfig.r must be an integer >= 1"):
        SealConfig(r=0)
    with pytest.raises(ValueError, match="does not match"):
        release(released / "sealed", tmp_path / "out", tmp_path / "proof", key="wrong-key-0123456789abc")
    assert not list(tmp_path.iterdir())
    with pytest.raises(FileExistsError):
        release(released / "sealed", released / "release", tmp_path / "proof", key=KEY)
    with pytest.raises(ValueError, match="must not be inside"):
        release(released / "sealed", tmp_path / "out", tmp_path / "out" / "proof", key=KEY)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="expected SEAL"):
        release(released / "release", tmp_path / "out", tmp_path / "proof", key=KEY)
    suspect = Suspect.from_adapter(read_adapter(released / "release"))
    digest = published(released)
    with pytest.raises(FileNotFoundError, match="Proof file"):
        verify_owner(suspect, tmp_path / "missing.safetensors", digest, key=KEY)
    with pytest.raises(ValueError, match="does not match"):
        verify_owner(suspect, released / "proof.safetensors", digest, key="wrong-key-0123456789abc")
    with pytest.raises(ValueError, match="does not match the published commitment"):
        verify_owner(suspect, released / "proof.safetensors", "0" * 64, key=KEY)
    with pytest.raises(ValueError, match="neither"):
        verify_owner(suspect, released / "proof.safetensors", "my-claim", key=KEY)
    record = json.loads((released / "release" / "seal_claim.json").read_text())
    (tmp_path / "altered.json").write_text(
        json.dumps({**record, "structure": [[m, o, i, 1] for m, o, i, _ in record["structure"]]})
    )
    with pytest.raises(ValueError, match="altered"):
        verify_owner(suspect, released / "proof.safetensors", tmp_path / "altered.json", key=KEY)
    ia3 = get_peft_model(build("llama"), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="IA3 adapter"):
        Suspect.from_adapter(tmp_path / "ia3")
    other = get_peft_model(build("mistral"), LoraConfig(r=4, target_modules=["q_proj"]))  # other shapes/names
    factors = {m: (torch.randn(3, 4), a) for m, (_, a) in lora_factors(other).items()}
    result = verify_owner(Suspect(factors=factors), released / "proof.safetensors", digest, key=KEY)
    assert not result.verified


def test_adapters_without_a_key_schedule_are_refused(released, tmp_path, monkeypatch):
    """A SEAL adapter trained before key schedules (its rows came from module names alone) or whose schedule was
    edited: loading and releasing it are errors, not a model with the wrong passports."""
    import shutil

    for schedule in (None, "0" * 64):
        shutil.rmtree(tmp_path / "old", ignore_errors=True)
        shutil.copytree(released / "sealed", tmp_path / "old")
        config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
        config["schedule"] = schedule
        (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="does not hash to the key schedule"):
            release(tmp_path / "old", tmp_path / "out", tmp_path / "proof", key=KEY)
        assert not (tmp_path / "out").exists() and not (tmp_path / "proof").exists()
        monkeypatch.setenv(KEY_ENV, KEY)
        with pytest.raises(ValueError, match="no key schedule" if schedule is None else "another structure"):
            PeftModel.from_pretrained(build("llama"), tmp_path / "old")


def test_cli_release_verify_attack(released, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    assert cli(["seal", "attack", str(released / "release"), str(tmp_path / "pruned"), "--kind", "prune"]) == 0
    proof = str(released / "proof.safetensors")
    claim = ["--published", published(released)]
    assert cli(["seal", "verify", str(tmp_path / "pruned"), "--proof", proof, *claim]) == 0
    assert cli(["seal", "verify", str(tmp_path / "pruned"), "--proof", proof]) == 2  # no published claim
    capsys.readouterr()
    assert cli(["seal", "verify", str(tmp_path / "pruned"), "--mode", "key", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"]
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build("llama").state_dict().items()}, base)
    merged = tmp_path / "merged.safetensors"
    assert cli(["seal", "attack", str(released / "release"), str(merged), "--kind", "merge", "--base", str(base)]) == 0
    assert cli(["seal", "verify", str(merged), "--base", str(base), "--mode", "key", "--r", str(R)]) == 0
    # a base of another architecture, and an r no module can hold, are errors (exit 2), not "not verified"
    other = tmp_path / "gpt2.safetensors"
    save_file({k: v.clone().contiguous() for k, v in build("gpt2").state_dict().items()}, other)  # tied weights
    capsys.readouterr()
    assert cli(["seal", "verify", str(merged), "--base", str(other), "--mode", "key", "--r", str(R)]) == 2
    assert "have a weight of the same name and shape in --base" in capsys.readouterr().err
    assert cli(["seal", "verify", str(merged), "--base", str(base), "--mode", "key", "--r", "1000"]) == 2
    assert "r = 1000 is not below the input features" in capsys.readouterr().err
    (tmp_path / "forger.key").write_text("forger-key-0123456789abcdef")
    forged = tmp_path / "forged.safetensors"
    assert (
        cli(
            [
                "seal",
                "attack",
                str(released / "release"),
                str(forged),
                "--kind",
                "forge",
                "--forged-key-file",
                str(tmp_path / "forger.key"),
            ]
        )
        == 0
    )
    forger_digest = capsys.readouterr().out.split()[-1]
    verify_forged = ["seal", "verify", str(released / "release"), "--proof", str(forged)]
    verify_forged += ["--key-file", str(tmp_path / "forger.key"), "--published"]
    assert cli([*verify_forged, published(released)]) == 2  # refused: not the published claim, no verdict
    assert cli([*verify_forged, forger_digest]) == 1  # a digest of the forger's own: not verified
    monkeypatch.setenv(KEY_ENV, "not-the-owner-0123456789")
    assert cli(["seal", "verify", str(tmp_path / "pruned"), "--mode", "key"]) == 1
    assert cli(["seal", "verify", str(tmp_path / "pruned"), "--proof", proof, *claim]) == 2
    assert cli(["seal", "release", str(released / "sealed"), str(tmp_path / "rel2")]) == 2
    assert not (tmp_path / "rel2").exists()


@pytest.mark.parametrize("damage", ["nan", "rank"])
def test_damaged_factors_are_an_error_with_its_own_exit_code(released, tmp_path, capsys, monkeypatch, damage):
    """Exit status 2 (error) with one line naming the module, never 1 (not verified) or a traceback."""
    import shutil

    from safetensors.torch import load_file

    suspect = tmp_path / "suspect"
    shutil.copytree(released / "release", suspect)
    tensors = load_file(suspect / "adapter_model.safetensors")
    name = next(k for k in tensors if k.endswith("lora_A.weight"))
    if damage == "nan":
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, suspect / "adapter_model.safetensors")
    monkeypatch.setenv(KEY_ENV, KEY)
    assert cli(["seal", "verify", str(suspect), "--mode", "key"]) == 2
    err = capsys.readouterr().err.strip()
    module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert len(err.splitlines()) == 1 and module in err
    assert ("NaN" in err) if damage == "nan" else ("do not form a LoRA pair" in err)


def test_the_key_and_passports_are_never_pickled(tmp_path):
    import copy
    import pickle

    config = SealConfig(r=4, target_modules=TARGETS, key=KEY)
    assert KEY.encode() not in pickle.dumps(config)
    assert copy.deepcopy(config).secret_key() == KEY.encode()  # an in-memory copy keeps it
    model = sealed_model(init_weights=False)
    with pytest.raises(TypeError, match="save_pretrained"):
        torch.save(model, tmp_path / "model.pt")
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(model)
    x = inputs("llama")
    torch.testing.assert_close(output(copy.deepcopy(model), x), output(model, x))


def test_key_mode_says_when_the_structure_comes_from_the_suspect(released):
    suspect = Suspect.from_adapter(read_adapter(released / "release"))
    record = read_claim(released / "release" / "seal_claim.json")
    assert "structure the suspect shows" in verify_key(suspect, key=KEY).message
    assert "structure the suspect shows" not in verify_key(suspect, key=KEY, claim=record).message


def test_near_null_rank_padding_does_not_dilute_a_claim(released):
    """Padding the release from rank 16 to 40 with near-null components: owner mode (rank from the published
    claim) and key mode with the owner's r compare the suspect's top directions only and still verify."""
    g = torch.Generator().manual_seed(0)
    plain = read_adapter(released / "release")
    padded = {}
    for module, (B, A) in plain.factors.items():
        extra_B = 1e-4 * torch.randn(B.shape[0], 24, generator=g)
        padded[module] = (torch.cat([B, extra_B], 1), torch.cat([A, torch.randn(24, A.shape[1], generator=g)], 0))
    suspect = Suspect.from_adapter(LoraFactors(padded, plain.scaling))
    owner = verify_owner(suspect, released / "proof.safetensors", published(released), key=KEY)
    assert owner.verified and owner.security_bits > 64
    assert verify_key(suspect, key=KEY, r=R).verified


def shifted(module: str) -> str:
    """Layer i saved as layer (i + 1) % 2: every name exists in the claim, each on the wrong module."""
    head, index, tail = module.split(".", 3)[:2], module.split(".")[2], module.split(".", 3)[3]
    return ".".join([*head, str((int(index) + 1) % 2), tail])


RENAMINGS = {
    "backbone prefix": lambda m: m.replace("model.layers.", "backbone.blocks."),
    "one layer off (finding 3)": shifted,
    "opaque names, reversed order": lambda m: f"m{999 - sum(map(ord, m)) * 7 % 1000:03d}",
}


@pytest.mark.parametrize("renaming", list(RENAMINGS))
def test_modules_are_paired_by_structure_whatever_their_names(released, renaming):
    """The release saved under other module names: prefixed (as for the backbone), shifted by one layer (each name
    of the claim on another module) or opaque. Owner mode and key mode with the owner's record pair modules by
    structure and verify past 2^-64; key mode from the suspect's own names finds nothing once the set of names
    differs (and says why)."""
    plain = read_adapter(released / "release")
    renamed = {RENAMINGS[renaming](m): f for m, f in plain.factors.items()}
    assert len(renamed) == len(plain.factors) and all(RENAMINGS[renaming](m) != m for m in plain.factors)
    suspect = Suspect.from_adapter(LoraFactors(renamed, plain.scaling))
    owner = verify_owner(suspect, released / "proof.safetensors", published(released), key=KEY)
    assert owner.verified and owner.security_bits > 64, owner
    assert "paired by structure" in owner.message and "6 suspect modules carry another name" in owner.message
    assert owner.components["passport"]["statistic"] > 0.99  # the passport test follows the same pairing
    record = read_claim(released / "release" / "seal_claim.json")  # the owner's public record
    with_record = verify_key(suspect, key=KEY, claim=record)
    assert with_record.verified and with_record.components["by_structure"]["renamed"] == 6
    assert f"The record's digest is {published(released)}" in with_record.message  # to compare with the publication
    alone = verify_key(suspect, key=KEY)  # key rows from the names the suspect shows: right only if the set is
    assert alone.verified == (set(renamed) == set(plain.factors)) and "structure the suspect shows" in alone.message
    with pytest.raises(ValueError, match="does not match the commitment"):
        verify_key(suspect, key="another-key-0123456789", claim=record)


def test_key_mode_names_the_digest_of_an_edited_record(released):
    """Finding 8: key mode has no publication to check a record against, so a record whose ranks were edited and
    rehashed is taken as it is. Its key rows are then another structure's (nothing verifies), and the result names
    the record's digest, which differs from the published one."""
    from dataclasses import replace

    record = read_claim(released / "release" / "seal_claim.json")
    edited = replace(record, structure=tuple((m, o, i, 1) for m, o, i, _ in record.structure))
    result = verify_key(Suspect.from_adapter(read_adapter(released / "release")), key=KEY, claim=edited)
    assert edited.digest() != published(released) and f"The record's digest is {edited.digest()}" in result.message
    assert not result.verified


def test_key_mode_with_the_record_takes_ranks_from_it_not_from_the_suspect(released, tmp_path, capsys):
    """Rank padding against key mode: with the owner's record, the key rows per module are the record's rank, so
    a release padded from 16 to 60 near-null components verifies; from the suspect's own rank it is diluted."""
    g = torch.Generator().manual_seed(1)
    plain = read_adapter(released / "release")
    padded = {
        m: (
            torch.cat([B, 1e-4 * torch.randn(B.shape[0], 44, generator=g)], 1),
            torch.cat([A, torch.randn(44, A.shape[1], generator=g)]),
        )
        for m, (B, A) in plain.factors.items()
    }
    suspect = Suspect.from_adapter(LoraFactors(padded, plain.scaling))
    record = read_claim(released / "release" / "seal_claim.json")
    diluted, exact = verify_key(suspect, key=KEY), verify_key(suspect, key=KEY, claim=record)
    assert exact.verified and exact.log10_p < diluted.log10_p - 10
    write_lora(tmp_path / "padded", LoraFactors(padded, plain.scaling, dict(plain.config)))
    (tmp_path / "key").write_text(KEY)
    common = ["seal", "verify", str(tmp_path / "padded"), "--mode", "key", "--key-file", str(tmp_path / "key")]
    assert cli([*common, "--published", str(released / "release" / "seal_claim.json")]) == 0
    assert cli([*common, "--published", published(released)]) == 2  # a digest holds no ranks
    assert "claim record file" in capsys.readouterr().err


def llama_with_gains(seed=0):
    """The tiny LLaMA with random RMSNorm gains (as pretrained models have), so folding them changes weights."""
    model = build("llama", seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5)
    return model


@pytest.fixture(scope="module")
def gentle(tmp_path_factory):
    """A SEAL adapter trained gently enough that its merged delta is small next to the weights (as in real
    fine-tuning: a few percent), released; plus the base weights and the merged model."""
    root = tmp_path_factory.mktemp("seal-merged")
    model = get_peft_model(llama_with_gains(), SealConfig(r=R, target_modules=TARGETS, key=KEY))
    train(model, steps=20, lr=2e-3)
    model.save_pretrained(root / "sealed")
    claim = release(root / "sealed", root / "release", root / "proof.safetensors", key=KEY)
    base = {k: v.clone() for k, v in llama_with_gains().state_dict().items()}
    merged = attacks.merge(read_adapter(root / "release"), base)
    return root, claim.digest(), base, merged


def logits_of(weights, config):
    import transformers

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False})
    )
    model.load_state_dict(weights, strict=False)
    return model.eval()(input_ids=torch.arange(2, 26).view(2, 12)).logits


REWRITES = {
    "permute_heads": lambda w, c: attacks.permute_heads(w, c, seed=1),
    "rotate_residual": lambda w, c: attacks.rotate_residual(w, c, seed=1),
    "rotate_and_permute": lambda w, c: attacks.permute_heads(attacks.rotate_residual(w, c, seed=1), c, seed=2),
    # finding 4 of the SEAL issue: norm gains re-introduced after rotating (and permuting)
    "rotate_permute_rescale_norms": lambda w, c: attacks.rescale_norms(
        attacks.permute_heads(attacks.rotate_residual(w, c, seed=1), c, seed=2), c, seed=3
    ),
    "rescale_norms": lambda w, c: attacks.rescale_norms(w, c, seed=3),
}


@pytest.mark.parametrize("rewrite", list(REWRITES))
def test_function_preserving_rewrites_of_a_merged_model_still_verify(gentle, rewrite):
    """Head/neuron permutations with sign flips and a residual-stream rotation (norm gains folded) leave the merged
    model's logits unchanged and move every adapted weight far from its base; the verifier aligns the suspect to
    the base first, and both modes verify (recovering the plain merge's deltas to rounding)."""
    root, digest, base, merged = gentle
    config = build("llama").config
    attacked = REWRITES[rewrite](merged, config)
    torch.testing.assert_close(logits_of(attacked, config), logits_of(merged, config), atol=2e-5, rtol=1e-4)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (attacked[name] - base[name]).norm() > base[name].norm()  # far from the base before alignment
    plain, suspect = Suspect.from_merged(merged, base, rank=R), Suspect.from_merged(attacked, base, rank=R)
    assert set(suspect.deltas) == set(plain.deltas) and "aligned to the base" in suspect.note
    for module, delta in plain.deltas.items():
        torch.testing.assert_close(
            suspect.deltas[module], delta, atol=1e-5 * base[module + ".weight"].abs().max(), rtol=0
        )
    owner = verify_owner(suspect, root / "proof.safetensors", digest, key=KEY)
    assert owner.verified and owner.security_bits > 64 and "aligned to the base" in owner.message
    assert verify_key(suspect, key=KEY, r=R).verified


def test_rewritten_merge_of_an_unrelated_adapter_does_not_verify(gentle):
    """The null after alignment: a plain LoRA trained on the same base, merged and rotated, is aligned as well as
    the owner's, and the owner's key does not verify it (alignment never sees the key)."""
    _, _, base, _ = gentle
    model = get_peft_model(llama_with_gains(), LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="gaussian"))
    train(model, steps=20, lr=2e-3, seed=5)
    merged = model.merge_and_unload().state_dict()
    config = build("llama").config
    suspect = Suspect.from_merged(REWRITES["rotate_and_permute"](merged, config), base, rank=R)
    assert len(suspect.deltas) == 6 and "aligned to the base" in suspect.note
    result = verify_key(suspect, key=KEY, r=R)
    assert not result.verified and result.p_value > 1e-3, result


@pytest.fixture(scope="module")
def released_qv(tmp_path_factory):
    """The SEAL issue's small LLaMA release: SEAL on q_proj and v_proj (4 modules), r = 8."""
    root = tmp_path_factory.mktemp("seal_qv")
    train(sealed_model(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(root / "sealed")
    release(root / "sealed", root / "release", root / "proof.safetensors", key=KEY)
    return root


def saved_again(weights, how):
    """A merged model saved in bf16, or with noise of 1% of each 2-D weight's spread added to every entry."""
    return attacks.round_to_bf16(weights) if how == "bf16" else attacks.noisy_weights(weights, 0.01, seed=7)


@pytest.mark.parametrize("how", ["bf16", "noise"])
def test_key_mode_reads_a_merged_models_structure_through_rounding_and_noise(released_qv, how):
    """Item 4 of the SEAL issue: saved in bf16 or with 1% noise, every 2-D weight of the merged model differs from
    the base (16 modules, where the adapter had 4); before, key mode took all 16 as the structure and found
    nothing (log10 p -0.7 and -0.6). Now it takes the modules whose delta is a clear rank-r update, which is the
    claim's structure, and verifies without the record, as with it."""
    plain = read_adapter(released_qv / "release")
    base = dict(build("llama").state_dict())
    suspect = Suspect.from_merged(saved_again(attacks.merge(plain, base), how), base, rank=8)
    assert len(suspect.deltas) == 16
    alone = verify_key(suspect, key=KEY, r=8)
    assert alone.verified and alone.modules == 4 and alone.log10_p < -15, alone
    record = read_claim(released_qv / "release" / "seal_claim.json")
    assert verify_key(suspect, key=KEY, claim=record).verified
    assert not verify_key(suspect, key="unrelated-key-0123456789", r=8).verified


def test_key_mode_refuses_a_merged_model_whose_structure_it_cannot_read(
    released, released_qv, tmp_path, capsys, monkeypatch
):
    """Where the adapted modules cannot be told from noise, key mode without the record refuses and says to pass
    it: a module whose smaller side is not above r (v_proj, 16 x 32, at r = 16) beside a noise floor, and an
    adapter scaled down into the noise. With the record both verify or are judged; exact merges need no record."""
    base = dict(build("llama").state_dict())
    wide = read_adapter(released / "release")
    rounded = Suspect.from_merged(saved_again(attacks.merge(wide, base), "bf16"), base, rank=R)
    with pytest.raises(ValueError, match=r"side not above r.*--published seal_claim.json"):
        verify_key(rounded, key=KEY, r=R)
    assert verify_key(rounded, key=KEY, claim=read_claim(released / "release" / "seal_claim.json")).verified
    small = read_adapter(released_qv / "release")
    faint = LoraFactors({m: (B * 1e-4, A) for m, (B, A) in small.factors.items()}, small.scaling)
    noisy = Suspect.from_merged(saved_again(attacks.merge(faint, base), "noise"), base, rank=8)
    with pytest.raises(ValueError, match="Pass the owner's public record"):
        verify_key(noisy, key=KEY, r=8)
    assert verify_key(Suspect.from_merged(attacks.merge(wide, base), base), key=KEY, r=R).verified
    weights, base_file = tmp_path / "merged.safetensors", tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in saved_again(attacks.merge(wide, base), "bf16").items()}, weights)
    save_file({k: v.contiguous() for k, v in base.items()}, base_file)
    capsys.readouterr()
    monkeypatch.setenv(KEY_ENV, KEY)
    args = ["seal", "verify", str(weights), "--base", str(base_file), "--mode", "key"]
    assert cli([*args, "--r", str(R)]) == 2 and "--published seal_claim.json" in capsys.readouterr().err
    record = str(released / "release" / "seal_claim.json")
    assert cli([*args, "--published", record]) == 0


def test_pad_rank_and_rename_keep_the_function_and_are_refused_on_bad_input(released):
    plain = read_adapter(released / "release")
    padded = attacks.pad_rank(plain, 24)
    for module in plain.factors:
        assert padded.factors[module][1].shape[0] == R + 24
        base = plain.delta(module)
        assert (padded.delta(module) - base).norm() < 1e-3 * base.norm()
    renamed = attacks.rename(plain, "model.layers.", "backbone.blocks.")
    assert all(m.startswith("backbone.blocks.") for m in renamed.factors)
    with pytest.raises(ValueError, match="extra >= 1"):
        attacks.pad_rank(plain, 0)
    with pytest.raises(ValueError, match="would merge modules"):
        attacks.rename(plain, "q_proj", "v_proj")


def test_distillation_trains_a_fresh_adapter_towards_the_teacher(released):
    """The distillation attack: a fresh LoRA learns the released model's outputs (its KL to the teacher falls);
    its adapter starts from its own random A, so the owner's key does not verify it (a limit: docs/seal.md)."""
    teacher = PeftModel.from_pretrained(build("llama"), released / "release")
    student = get_peft_model(build("llama"), LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(2, 60, (4, 12), generator=g)} for _ in range(30)]

    def kl() -> float:
        with torch.no_grad():
            x = batches[0]["input_ids"]
            p, q = teacher(input_ids=x).logits.log_softmax(-1), student(input_ids=x).logits.log_softmax(-1)
            return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))

    before = kl()
    attacks.distill(teacher, student, batches, steps=30, lr=1e-2)
    assert kl() < 0.5 * before
    result = verify_key(Suspect.from_adapter(LoraFactors.from_model(student)), key=KEY, r=R)
    assert not result.verified


def test_owner_verdict_rests_on_the_key_test_when_fine_tuning_wears_down_the_passport(released):
    """Continued fine-tuning at a high learning rate scrambles the passport signs long before A's row space
    leaves the key's: the owner verdict, decided by the key-only test with the claim's ranks, still holds where
    the paper's passport test alone would no longer reach 2^-64."""
    model = PeftModel.from_pretrained(build("llama"), released / "release", is_trainable=True)
    train(model, steps=40, lr=1.3e-2, seed=9)
    suspect = Suspect.from_adapter(LoraFactors.from_model(model))
    owner = verify_owner(suspect, released / "proof.safetensors", published(released), key=KEY)
    assert owner.verified and owner.log10_p == owner.components["key"]["log10_p"]
    assert owner.components["passport"]["log10_p"] > np.log10(2.0**-64), owner.components["passport"]


def test_a_larger_initial_a_keeps_more_evidence_through_continued_fine_tuning(tmp_path):
    """Finding 5 of the SEAL issue (measured in benchmarks/seal_finetune_attack.py): an attacker's continued
    fine-tuning turns A's row space away from the key's. ``init_a_scale`` multiplies the key-derived A (the
    verdict is scale-free), and Adam's fixed-size steps then turn it less, under the owner's training and the
    attacker's alike."""
    evidence = {}
    for scale in (1.0, 8.0):
        model = get_peft_model(build("llama"), SealConfig(r=R, target_modules=TARGETS, init_a_scale=scale, key=KEY))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        schedule = model.peft_config["default"].schedule
        a0 = initial_a(KEY.encode(), schedule, "model.layers.0.self_attn.q_proj", R, 32)
        torch.testing.assert_close(layer.seal_A["default"].weight, scale * a0)
        train(model, steps=30, lr=1e-2)
        model.save_pretrained(tmp_path / f"sealed{scale}")
        claim = release(tmp_path / f"sealed{scale}", tmp_path / f"release{scale}", tmp_path / f"proof{scale}", key=KEY)
        attacked = PeftModel.from_pretrained(build("llama"), tmp_path / f"release{scale}", is_trainable=True)
        g = torch.Generator().manual_seed(4)
        batches = [torch.randint(2, 60, (4, 12), generator=g) for _ in range(60)]
        batches = [{"input_ids": ids, "labels": ids} for ids in batches]
        attacks.continued_finetune(attacked, batches, 60, lr=5e-2, warmup_steps=5, max_grad_norm=1.0)
        suspect = Suspect.from_adapter(LoraFactors.from_model(attacked))
        evidence[scale] = verify_owner(suspect, tmp_path / f"proof{scale}", claim.digest(), key=KEY).log10_p
    assert evidence[8.0] < 2 * evidence[1.0] and evidence[8.0] < np.log10(2.0**-64), evidence
    with pytest.raises(ValueError, match="init_a_scale must be a finite number > 0"):
        SealConfig(init_a_scale=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        attacks.continued_finetune(attacked, [], 1, max_grad_norm=0.0)


def test_the_command_lines_copies_of_library_constants_match_them():
    """The seal parser holds literal copies (so that building it loads neither torch nor peft): each must equal
    the value it copies."""
    from peft_ctrl.seal import release as release_module
    from peft_ctrl.seal import verify as verify_module
    from peft_ctrl_app.forensics import cli as seal_cli

    assert seal_cli.KEY_ENV == KEY_ENV
    assert seal_cli.OWNER_THRESHOLD == verify_module.OWNER_THRESHOLD
    assert seal_cli.DEFAULT_THRESHOLD == verify_module.DEFAULT_THRESHOLD
    assert seal_cli.CLAIM_FILE == release_module.CLAIM_FILE
    assert seal_cli.WEIGHT_ATTACKS == attacks.WEIGHT_ATTACKS
