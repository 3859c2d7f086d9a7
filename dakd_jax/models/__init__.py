"""Models: the re-ID ResNet (`resnet`) and its ImageNet weight import (`weights`)."""
from dakd_jax.models.resnet import create_model
from dakd_jax.models.resnet import init_variables
from dakd_jax.models.resnet import output_features
from dakd_jax.models.resnet import ReIDResNet
from dakd_jax.models.resnet import ResNet18
from dakd_jax.models.resnet import ResNet34
from dakd_jax.models.resnet import ResNet50
from dakd_jax.models.weights import import_torchvision_resnet
from dakd_jax.models.weights import load_pretrained
from dakd_jax.models.weights import load_state_dict
from dakd_jax.models.weights import WeightsError
