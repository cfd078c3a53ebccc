"""`infer.py` on a DeepSeek-V4.1 checkpoint (issue 20): the golden fixture directory generates the official
code's greedy tokens, plain and with DSpark (and a chunked prefill); a prompts file serves prompts of
several lengths; an image file goes through the preprocessing into the prompt;
what V4.1 does not support yet is refused in one line naming the flag."""

import os

import numpy as np
import pytest

import infer
from v41_fixtures import FIXTURES, load, needs_fixtures

pytestmark = needs_fixtures
TOKEN_MAP = os.path.join(FIXTURES, "engram_token_map.npy")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("v41")
    os.symlink(os.path.join(FIXTURES, "config.json"), d / "config.json")
    os.symlink(os.path.join(FIXTURES, "model.safetensors"), d / "model.safetensors")
    np.save(d / "prompt.npy", load("input_ids.npy"))
    return str(d)


def _run(capsys, *argv):
    code = infer.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.slow
def test_the_fixture_generates_the_official_tokens(checkpoint, capsys, speculative):
    code, out, err = _run(capsys, "--checkpoint", checkpoint, "--prompt-ids", os.path.join(checkpoint, "prompt.npy"),
                          "--engram-token-map", TOKEN_MAP, "--max-new-tokens", "7", "--dtype", "float32",
                          *(["--speculative", "--prefill-chunk", "3"] if speculative else []))
    assert code == 0, err
    want = load("generated_ids.npy")
    assert out.splitlines() == [f"[{b}] " + " ".join(map(str, row)) for b, row in enumerate(want)]
    assert "DeepSeek-V4.1" in err and ("DSpark accepted" in err) == speculative


@pytest.mark.slow
def test_an_image_file_enters_the_prompt(checkpoint, capsys, tmp_path):
    from PIL import Image

    pixels = (np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    (tmp_path / "ids.txt").write_text("5 6 7 8\n")
    code, out, err = _run(capsys, "--checkpoint", checkpoint, "--prompt-ids", str(tmp_path / "ids.txt"),
                          "--engram-token-map", TOKEN_MAP, "--max-new-tokens", "3", "--image", str(tmp_path / "pic.png"))
    assert code == 0, err
    assert len(out.split()) == 3
    # the span: 60 x 90 pixels scale up to >= vision_min_pixels, then the ViT / aligner grid decides its length
    from v4jax.config_v41 import V41Config
    from v4jax.inference.images import image_tokens, load_image

    cfg = V41Config.from_json_file(os.path.join(checkpoint, "config.json"))
    _, grid = load_image(tmp_path / "pic.png", cfg)
    assert f"{image_tokens(grid, cfg) + 4} prompt" in err


@pytest.mark.slow
def test_a_prompts_file_of_mixed_lengths_gives_each_prompt_its_own_tokens(checkpoint, capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))  # the fixture's 256 ids
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    prompts = ("w5 w9", "w5 w9 w17 w100 w3 w42 w250")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = ["--checkpoint", checkpoint, "--tokenizer", str(tmp_path / "tokenizer.json"), "--engram-token-map", TOKEN_MAP,
              "--max-new-tokens", "4", "--dtype", "float32"]
    code, out, err = _run(capsys, *common, "--prompts-file", str(tmp_path / "prompts.txt"))
    assert code == 0, err
    lines = sorted(out.splitlines())  # served over 2 slots (continuous batching): printed as each finishes
    assert [line[:4] for line in lines] == ["[0] ", "[1] "] and "served 2 prompts over 2 slots" in err
    for i, text in enumerate(prompts):
        code, alone, err = _run(capsys, *common, "--prompt", text)
        assert code == 0, err
        assert lines[i] == f"[{i}] {alone.rstrip(chr(10))}" and len(alone.split()) == 4  # four decoded ids


@pytest.mark.parametrize("argv, message", [
    (["--slots", "0"], "--slots must be a positive integer"),
    (["--slots", "2", "--speculative"], "without --speculative"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be a positive number of tokens, got 0"),
    (["--image", "/nonexistent/pic.png"], "/nonexistent/pic.png"),
    ([], "needs the release's tokenizer.json"),  # no --engram-token-map and no tokenizer
])
def test_unsupported_or_bad_input_is_refused_in_one_line(checkpoint, capsys, argv, message):
    base = ["--checkpoint", checkpoint, "--prompt-ids", os.path.join(checkpoint, "prompt.npy")]
    if argv[:1] == ["--image"]:
        base += ["--engram-token-map", TOKEN_MAP]
    code, _, err = _run(capsys, *base, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_parity_dump_compares_equal_to_the_official_arrays(checkpoint, tmp_path, capsys):
    """`parity dump` on the fixture directory, then `parity compare` against the official code's arrays of the
    same names (logits, every block's streams, the Engram-updated streams); the teacher-forced cached decode
    equals the stateless logits at the same positions."""
    from v4jax import parity

    out = str(tmp_path / "ours")
    assert parity.main(["dump", "--checkpoint", checkpoint, "--input-ids", os.path.join(checkpoint, "prompt.npy"),
                        "--out", out, "--engram-token-map", TOKEN_MAP, "--decode-from", "34"]) == 0
    ref = tmp_path / "official"
    ref.mkdir()
    for name in ("logits", "hidden_states", "engram_block_inputs"):
        os.symlink(os.path.join(FIXTURES, f"{name}.npy"), ref / f"{name}.npy")
    decode = np.load(os.path.join(out, "decode_logits.npy"))
    os.remove(os.path.join(out, "decode_logits.npy"))
    capsys.readouterr()
    assert parity.main(["compare", out, str(ref)]) == 0, capsys.readouterr().out
    np.testing.assert_allclose(decode, load("logits.npy")[:, 33:], rtol=0, atol=2e-5)
