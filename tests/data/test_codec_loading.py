"""Loading the codec prints no ``transformers`` bar (each preprocessing worker loads its own
copy: one "Loading weights" bar per worker), and leaves the library's setting as it found it."""

from transformers.utils import logging as hf_logging

from megatron_ualm.data.codec import XCodec


def test_the_codec_loads_without_the_library_bar_and_restores_its_setting(codec_dir, capfd):
    assert hf_logging.is_progress_bar_enabled()
    codec = XCodec(codec_dir, device="cpu")
    assert codec.codebook_size > 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # put back
    hf_logging.disable_progress_bar()
    try:
        XCodec(codec_dir, device="cpu")
        assert not hf_logging.is_progress_bar_enabled()  # a caller's choice stays
    finally:
        hf_logging.enable_progress_bar()
