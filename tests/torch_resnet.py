"""Torch reference networks for the weight-import tests, with the checkpoints' parameter names.

`TorchResNet`: torchvision's module and parameter names (torchvision itself is not importable in
this environment), last stride 1. `AuthorsNetwork`: the authors' released network with their
names (method.md 2.1, issue 12): that ResNet-50 as `backbone`, AGW non-local blocks `NL_2`/`NL_3`
computed with the full N x N affinity (not our rank-one shortcut), GeM `pool.p` of shape (1,),
and a BNNeck `bn_neck` whose shift stays 0; a teacher also has class-centre memories.
"""
import torch


class TorchBasicBlock(torch.nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + shortcut)


class TorchBottleneck(torch.nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.conv3 = torch.nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + shortcut)


class TorchResNet(torch.nn.Module):
  """torchvision ResNet layout with last stride 1; forward returns the layer4 map (NCHW)."""

  def __init__(self, depth, width):
    super().__init__()
    block = TorchBottleneck if depth == 50 else TorchBasicBlock
    sizes = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(width)
    self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    self.inplanes = width
    for stage, (count, stride) in enumerate(zip(sizes, (1, 2, 2, 1)), start=1):
      setattr(self, f"layer{stage}", self._layer(block, width * 2 ** (stage - 1), count, stride))
    self.fc = torch.nn.Linear(self.inplanes, 10)

  def _layer(self, block, planes, count, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = torch.nn.Sequential(
          torch.nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          torch.nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, 1, None) for _ in range(1, count)]
    return torch.nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise_(net, seed):
  """He-normal ResNet convs (those without bias; the non-local 1x1 convs keep PyTorch's uniform
  init), random BN affine parameters and running statistics, in place."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv2d) and module.bias is None:
        torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
  return net


def make_torch_resnet(depth, width, seed):
  """TorchResNet in eval mode with random weights and BN statistics (`randomise_`)."""
  torch.manual_seed(seed)
  return randomise_(TorchResNet(depth, width), seed).eval()


def numpy_state_dict(net):
  return {name: value.detach().numpy().copy() for name, value in net.state_dict().items()}


class TorchNonLocal(torch.nn.Module):
  """AGW non-local block, intermediate width 1: x + W(theta phi^T g / N), affinity N x N."""

  def __init__(self, channels):
    super().__init__()
    self.g = torch.nn.Sequential(torch.nn.Conv2d(channels, 1, 1))
    self.W = torch.nn.Sequential(torch.nn.Conv2d(1, channels, 1), torch.nn.BatchNorm2d(channels))
    self.theta = torch.nn.Conv2d(channels, 1, 1)
    self.phi = torch.nn.Conv2d(channels, 1, 1)

  def forward(self, x):
    batch, _, height, width = x.shape
    g_x = self.g(x).flatten(2).transpose(1, 2)  # [b, N, 1]
    theta_x = self.theta(x).flatten(2).transpose(1, 2)  # [b, N, 1]
    phi_x = self.phi(x).flatten(2)  # [b, 1, N]
    affinity = theta_x @ phi_x / (height * width)  # [b, N, N]
    y = (affinity @ g_x).transpose(1, 2).reshape(batch, 1, height, width)
    return x + self.W(y)


class TorchGeM(torch.nn.Module):
  """(mean_hw clamp(x, 1e-6)^p)^(1/p) with p a (1,) parameter, as the authors store it."""

  def __init__(self, p):
    super().__init__()
    self.p = torch.nn.Parameter(torch.full((1,), p))

  def forward(self, x):
    return x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class AuthorsBackbone(TorchResNet):
  """ResNet-50, last stride 1, non-local blocks after blocks 2, 3 of layer2 and 3, 4, 5 of layer3
  (0-based), GeM; forward returns the pooled [b, 32 * width] features."""
  NON_LOCAL_AFTER = {2: (2, 3), 3: (3, 4, 5)}

  def __init__(self, width, gem_p):
    super().__init__(50, width)
    del self.fc
    # The authors' attribute names, hence their state-dict names.
    self.NL_2 = torch.nn.ModuleList([TorchNonLocal(8 * width) for _ in range(2)])
    self.NL_3 = torch.nn.ModuleList([TorchNonLocal(16 * width) for _ in range(3)])
    self.pool = TorchGeM(gem_p)

  def forward(self, x):
    x = self.layer1(self.maxpool(torch.relu(self.bn1(self.conv1(x)))))
    for stage, non_local in ((2, self.NL_2), (3, self.NL_3)):
      after = self.NON_LOCAL_AFTER[stage]
      for index, block in enumerate(getattr(self, f"layer{stage}")):
        x = block(x)
        if index in after:
          x = non_local[after.index(index)](x)
    return self.pool(self.layer4(x))


class CentreMemory(torch.nn.Module):
  """A teacher's class-centre memory: a [classes, C] `features` buffer."""

  def __init__(self, classes, channels):
    super().__init__()
    self.register_buffer("features", torch.randn(classes, channels))


class AuthorsNetwork(torch.nn.Module):
  """backbone -> bn_neck; eval forward is the retrieval embedding unit(bn_neck(GeM(...)))."""

  def __init__(self, width, gem_p, memory_classes=0):
    super().__init__()
    self.backbone = AuthorsBackbone(width, gem_p)
    self.bn_neck = torch.nn.BatchNorm1d(32 * width)
    self.bn_neck.bias.requires_grad_(False)
    if memory_classes:
      self.memory_visible = CentreMemory(memory_classes, 32 * width)
      self.memory_infrared = CentreMemory(memory_classes, 32 * width)

  def forward(self, x):
    return torch.nn.functional.normalize(self.bn_neck(self.backbone(x)), dim=1)


def make_authors_network(width, seed, gem_p=2.6, memory_classes=0, image_size=(96, 48)):
  """AuthorsNetwork in eval mode: random weights and BN statistics, BNNeck shift 0.

  The BNNeck's running statistics are set near those of the pooled features of random images of
  `image_size` (randomly off by a factor), as training leaves them, so that they matter: with the
  generic random statistics the features (about 1e4 here) would swamp them.
  """
  torch.manual_seed(seed)
  net = randomise_(AuthorsNetwork(width, gem_p, memory_classes), seed).eval()
  with torch.no_grad():
    pooled = net.backbone(torch.randn(8, 3, *image_size))
    channels = pooled.shape[1]
    net.bn_neck.running_mean.copy_(pooled.mean(0) * torch.empty(channels).uniform_(0.5, 1.5))
    net.bn_neck.running_var.copy_(pooled.var(0) * torch.empty(channels).uniform_(0.5, 2.0))
    net.bn_neck.bias.zero_()
  return net
