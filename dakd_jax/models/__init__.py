"""Models: the re-ID ResNet (`resnet`) and its weight import (`weights`).

The `weights` names are resolved on first use: importing them here eagerly would put
`dakd_jax.models.weights` in sys.modules before `python -m dakd_jax.models.weights` runs it, which
makes runpy execute the module a second time and warn.
"""
from dakd_jax.models.resnet import create_model
from dakd_jax.models.resnet import init_variables
from dakd_jax.models.resnet import output_features
from dakd_jax.models.resnet import ReIDResNet
from dakd_jax.models.resnet import ResNet18
from dakd_jax.models.resnet import ResNet34
from dakd_jax.models.resnet import ResNet50

_WEIGHTS_NAMES = ("describe_weights_file", "import_authors_network", "import_torchvision_resnet",
                  "load_pretrained", "load_state_dict", "read_checkpoint_metadata",
                  "WeightsError")


def __getattr__(name):
  if name in _WEIGHTS_NAMES:
    from dakd_jax.models import weights  # pylint: disable=g-import-not-at-top
    return getattr(weights, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
