"""The one registry type."""

import pytest

from fgvc.registry import Registry


def test_register_build_list_and_errors() -> None:
    heads = Registry("head")

    @heads.register("linear")
    def linear(width: int) -> tuple[str, int]:
        return "linear", width

    heads.register("bilinear")(lambda: "bilinear")
    assert heads.list() == ["bilinear", "linear"]
    assert heads.build("linear", width=3) == ("linear", 3)
    assert "linear" in heads and "isqrt" not in heads
    with pytest.raises(ValueError, match="head 'linear' is already registered"):
        heads.register("linear")(lambda: None)
    with pytest.raises(KeyError, match="unknown head 'lineer'; did you mean 'linear'"):
        heads.get("lineer")
