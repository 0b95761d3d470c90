"""The multi-class decoder head, samfit's and the official code's (AutoGluon's SAMForSemanticSegmentation): the
query initialisation read against the SAM checkpoint it came from, the class head's layers and the parameter
counts against their formulas, the setting each protocol fills, and a run that records it and loads again."""
import json

import pytest
import torch
import yaml
from test_model import official_tiny_sam

import samfit
from samfit.config import RunConfig, make_config
from samfit.model.sam import PROMPT_DIM

pytestmark = pytest.mark.usefixtures("one_thread")
BINARY_DECODER = 3_505_536  # the cut binary decoder, every SAM size (docs/reference.md, Protocol)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sam = official_tiny_sam()
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_official_queries_are_all_token_0_of_the_checkpoint(checkpoint):
    sam, path = checkpoint
    tokens = sam.mask_decoder.mask_tokens.weight.detach()  # SAM's four mask tokens, all different
    model = samfit.build_model("tiny", num_classes=3, checkpoint=path, head="official")
    queries = model.mask_decoder.mask_tokens.weight
    assert queries.shape == (6, PROMPT_DIM) and model.head == "official"
    assert all(torch.equal(row, tokens[0]) for row in queries)  # no noise, no other token


def test_samfit_queries_cycle_tokens_0_to_3_plus_seeded_noise(checkpoint):
    sam, path = checkpoint
    tokens = sam.mask_decoder.mask_tokens.weight.detach()
    model = samfit.build_model("tiny", num_classes=3, checkpoint=path)
    noise = 0.02 * torch.randn((6, PROMPT_DIM), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.mask_decoder.mask_tokens.weight, tokens[[0, 1, 2, 3, 0, 1]] + noise,
                               rtol=0, atol=0)


def test_official_queries_without_a_checkpoint_are_equal_too():
    model = samfit.build_model("tiny", num_classes=4, image_size=64, num_queries=5, head="official")
    queries = model.mask_decoder.mask_tokens.weight
    assert queries.shape == (5, PROMPT_DIM) and queries[0].abs().sum() > 0
    assert all(torch.equal(row, queries[0]) for row in queries)


@pytest.mark.parametrize("classes, queries", [(3, None), (12, 10)])
def test_class_heads_and_counts_follow_their_formulas(classes, queries):
    """Trainable decoder = the binary decoder + (Q − 1) extra query rows of 256 + the class head: official one
    Linear(256, C+1), 257·(C+1); samfit's MLP 256 → 256 → C+1, 257·256 + 257·(C+1)."""
    q = queries or 2 * classes
    heads = {}
    for head in ("samfit", "official"):
        model = samfit.build_model("tiny", num_classes=classes, image_size=64, num_queries=queries, head=head)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        linears = [m for m in model.mask_decoder.class_head.modules() if isinstance(m, torch.nn.Linear)]
        heads[head] = trainable, [tuple(m.weight.shape) for m in linears]
        assert model.num_queries == q
        out = model(torch.randn(2, 3, 64, 64))
        assert out["class_logits"].shape == (2, q, classes + 1) and out["logits"].shape == (2, classes, 64, 64)
    extra = BINARY_DECODER + PROMPT_DIM * (q - 1)
    assert heads["official"] == (extra + 257 * (classes + 1), [(classes + 1, PROMPT_DIM)])
    assert heads["samfit"] == (extra + 257 * PROMPT_DIM + 257 * (classes + 1),
                               [(PROMPT_DIM, PROMPT_DIM), (classes + 1, PROMPT_DIM)])


def test_each_protocol_fills_its_head_and_a_given_one_wins(printed_config):
    assert RunConfig().head == "samfit" and RunConfig(protocol="official").head == "official"
    assert printed_config("--protocol", "official")["head"] == "official"
    assert printed_config("--protocol", "official", "--head", "samfit")["head"] == "samfit"
    assert printed_config("--head", "official")["protocol"] == "samfit"
    assert printed_config("--queries", "10")["queries"] == 10 and printed_config()["queries"] is None


def test_a_bad_head_or_query_count_is_a_clear_error(cli):
    code, _, message = cli("run", "--head", "offical", "--print-config")
    assert code == 2 and "--head 'offical': choose one of samfit, official" in message
    code, _, message = cli("run", "--queries", "0", "--print-config")
    assert code == 2 and "--queries 0: must be > 0" in message


def test_an_official_multiclass_run_records_its_head_and_load_run_rebuilds_it(tmp_path, data_root):
    from samfit.engine.train import run

    cfg = make_config(None, protocol="official", dataset="shapes-multiclass", image_size=64, epochs=1,
                      limit_train=4, limit_eval=2, queries=4, device="cpu", out=str(tmp_path / "runs"))
    folder = run(cfg, quiet=True)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert (config["head"], config["queries"], config["protocol"]) == ("official", 4, "official")
    assert json.loads((folder / "metrics.json").read_text())["protocol"] == "official"
    model = samfit.load_run(folder, device="cpu")
    assert model.head == "official" and model.num_queries == 4
    assert [type(m) for m in model.mask_decoder.class_head.layers] == [torch.nn.Linear]
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    state = model.state_dict()
    assert "mask_decoder.class_head.layers.0.weight" in best and all(torch.equal(state[k], v) for k, v in best.items())
    trained = best["mask_decoder.mask_tokens.weight"]
    assert not all(torch.equal(row, trained[0]) for row in trained)  # trained apart, if only slightly


def test_an_official_run_made_before_the_head_setting_loads_with_the_head_it_trained(tmp_path, data_root):
    """Official multi-class runs made before `head` existed trained samfit's head; their config.yaml has no `head`,
    so the protocol would fill `official`: load_run reads the head from the trained parameters instead."""
    from samfit.engine.train import run

    cfg = make_config(None, protocol="official", head="samfit", dataset="shapes-multiclass", image_size=64,
                      epochs=1, limit_train=4, limit_eval=2, device="cpu", out=str(tmp_path / "runs"))
    folder = run(cfg, quiet=True)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    del config["head"], config["queries"]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    model = samfit.load_run(folder, device="cpu")
    assert model.head == "samfit" and len(model.mask_decoder.class_head.layers) == 2
