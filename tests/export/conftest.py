"""The zoo's Flux pipeline, built once for the export tests (the packages' and the programs')."""
import pytest

from cachedit_fx import zoo


@pytest.fixture(scope="package")
def flux_pipe():
    return zoo.build_pipeline("flux")
