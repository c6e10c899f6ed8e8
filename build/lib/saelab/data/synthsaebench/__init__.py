"""`data=synthsaebench`: the SynthSAEBench world (arXiv 2602.14687) as SAELens's `sae_lens.synthetic` defines it:
N features in d dimensions with Zipf firing probabilities, a hierarchy with mutually exclusive siblings, a
Gaussian copula, per-feature magnitudes, near-orthogonal directions and a bias.

- spec.py: the knobs (`data.synthsaebench.*`), defaulting to the paper's 16k world;
- probabilities.py, magnitudes.py, copula.py, directions.py, hierarchy.py: the world's parts;
- sampler.py: activations from them; expectation.py: the marginal firing probabilities and expected L0;
- world.py: the world (SyntheticWorld's interface) and `build_world(spec)`;
- saelens_io.py: load and save a world in SAELens's on-disk format.
"""

from saelab.data.synthsaebench.saelens_io import load_world, save_world
from saelab.data.synthsaebench.spec import SynthSAEBenchSpec
from saelab.data.synthsaebench.world import SynthSAEBenchWorld, build_world


def world_of(spec: SynthSAEBenchSpec) -> SynthSAEBenchWorld:
    """The spec's world: loaded from spec.path when set, built from the spec otherwise."""
    return load_world(spec.path) if spec.path is not None else build_world(spec)


__all__ = ["SynthSAEBenchSpec", "SynthSAEBenchWorld", "build_world", "load_world", "save_world", "world_of"]
