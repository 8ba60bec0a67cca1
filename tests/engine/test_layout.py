import json

import numpy as np
import pytest

from engine.layout import LayoutError, TokenLayout


@pytest.fixture
def layout():
    return TokenLayout(codebook_size=512, tokens_per_view=16, chunk_size=2, action_dim=4,
                       action_low=(-1, -1, -1, 0), action_high=(1, 1, 1, 1))


def test_vocabulary_offsets(layout):
    assert (layout.image_offset, layout.action_offset, layout.text_offset, layout.special_offset) == (0, 512, 768, 1024)
    assert layout.special_names == ("bos", "instr", "/instr", "obs", "act", "rew", "yes", "no", "pad",
                                    "view:head", "view:wrist")
    assert layout.vocab_size == 1035
    assert (layout.yes_id, layout.no_id) == (1030, 1031)


def test_stream_lengths(layout):
    assert layout.observation_len == 1 + 2 * 17
    assert layout.action_len == 9
    assert layout.generated_len == 37
    assert layout.prefix_len(5) == 3 + 5 + 35


def test_encoding(layout):
    assert layout.encode_instruction("ab").tolist() == [1024, 1025, 768 + 97, 768 + 98, 1026]
    codes = np.arange(32).reshape(2, 16)
    obs = layout.encode_observation(codes)
    assert obs[:2].tolist() == [1027, 1033] and obs[18] == 1034 and obs[19:].tolist() == list(range(16, 32))
    actions = np.array([[-1.0, 0.0, 1.0, 0.5], [-5.0, 0.999, 0.0, 2.0]])
    assert layout.bin_actions(actions).tolist() == [[0, 128, 255, 128], [0, 255, 128, 255]]
    assert layout.encode_actions(actions)[0] == 1028
    np.testing.assert_allclose(layout.unbin_actions(np.array([[0, 255, 128, 0]])),
                               [[-1 + 1 / 256, 1 - 1 / 256, 1 / 256, 0.5 / 256]])


def test_generation_plan_and_split(layout):
    forced, low, high = layout.generation_plan()
    assert forced.shape == (37,)
    assert forced[:2].tolist() == [1027, 1033] and forced[18] == 1034 and forced[35] == 1029
    assert (forced[2:18] == -1).all() and (low[2:18] == 0).all() and (high[2:18] == 512).all()
    assert (forced[-1], low[-1], high[-1]) == (-1, 1030, 1032)
    codes = np.arange(32).reshape(2, 16)
    generated = np.concatenate([layout.encode_observation(codes), layout.encode_reward(True)])
    got_codes, success = layout.split_generated(generated)
    assert got_codes.tolist() == codes.tolist() and success is True


@pytest.mark.parametrize(("call", "message"), [
    (lambda l: l.encode_instruction(""), "instruction is empty"),
    (lambda l: l.encode_instruction("x" * 97), "97 UTF-8 bytes"),
    (lambda l: l.bin_actions(np.zeros((3, 4))), "expected (2, 4)"),
    (lambda l: l.bin_actions(np.full((2, 4), np.nan)), "NaN or inf"),
    (lambda l: l.encode_observation(np.full((2, 16), 512)), "image codes must lie in [0, 512)"),
])
def test_bad_input_names_the_problem(layout, call, message):
    with pytest.raises(LayoutError, match=__import__("re").escape(message)):
        call(layout)


def test_save_load_roundtrip_and_mismatch(layout, tmp_path):
    path = tmp_path / "layout.json"
    layout.save(path)
    assert TokenLayout.load(path) == layout
    data = json.loads(path.read_text())
    data["vocab_size"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=r"layout.json: vocab_size=999 does not match .* 1035"):
        TokenLayout.load(path)
    path.write_text("{not json")
    with pytest.raises(LayoutError, match="layout.json: not readable JSON"):
        TokenLayout.load(path)
    with pytest.raises(LayoutError, match="invalid token layout: codebook_size must be > 0"):
        TokenLayout(codebook_size=0, tokens_per_view=4)
