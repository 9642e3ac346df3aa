"""Text shipped with ferrolm: public-domain State of the Union excerpts (see NOTICE.txt)."""

from importlib import resources


def sample_text() -> str:
    return resources.files(__name__).joinpath("sotu.txt").read_text()
