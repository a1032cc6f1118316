"""Models written the way users write them: classes with a `forward` (the shapes of learn2learn's
OmniglotCNN, MiniImagenetCNN (CNN4), OmniglotFC and ResNet-12), plus small graphs with fan-out, concatenation
and tied weights. float64, small sizes."""

import torch
import torch.nn.functional as F
from torch import nn


class Lambda(nn.Module):
    """learn2learn's `l2l.nn.Lambda`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Flatten(nn.Module):
    """learn2learn's `l2l.nn.Flatten`."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, max_pool=True):
        super().__init__()
        stride = (2, 2)
        if max_pool:
            self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)
            stride = (1, 1)
        else:
            self.max_pool = lambda x: x
        self.normalize = nn.BatchNorm2d(cout, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)

    def forward(self, x):
        x = self.conv(x)
        x = self.normalize(x)
        x = self.relu(x)
        x = self.max_pool(x)
        return x


class ConvBase(nn.Sequential):
    def __init__(self, hidden, channels, max_pool, layers=4):
        super().__init__(*[ConvBlock(channels if i == 0 else hidden, hidden, max_pool) for i in range(layers)])


class OmniglotCNN(nn.Module):
    """learn2learn's OmniglotCNN: strided convolutions, spatial mean, `x.view(-1, 1, 28, 28)` first."""

    def __init__(self, output_size=5, hidden_size=4, layers=4):
        super().__init__()
        self.base = ConvBase(hidden_size, 1, max_pool=False, layers=layers)
        self.features = nn.Sequential(
            Lambda(lambda x: x.view(-1, 1, 28, 28)), self.base, Lambda(lambda x: x.mean(dim=[2, 3])), Flatten()
        )
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.mul_(0.0)

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return x


class CNN4Backbone(ConvBase):
    def forward(self, x):
        x = super().forward(x)
        x = x.reshape(x.size(0), -1)
        return x


class MiniImagenetCNN(nn.Module):
    """learn2learn's CNN4 (MiniImagenetCNN): conv-BN-ReLU-MaxPool blocks, `x.reshape(x.size(0), -1)`."""

    def __init__(self, output_size=5, hidden_size=4, layers=4, channels=3, side=1):
        super().__init__()
        self.features = CNN4Backbone(hidden_size, channels, max_pool=True, layers=layers)
        self.classifier = nn.Linear(side * side * hidden_size, output_size, bias=True)

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return x


class LinearBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(cout, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x):
        x = self.linear(x)
        x = self.normalize(x)
        x = self.relu(x)
        return x


class OmniglotFC(nn.Module):
    """learn2learn's OmniglotFC: Flatten, Linear-BatchNorm1d-ReLU blocks, a classifier."""

    def __init__(self, input_size=16, output_size=5, sizes=(8, 6)):
        super().__init__()
        blocks = [LinearBlock(input_size, sizes[0])] + [LinearBlock(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = nn.Linear(sizes[-1], output_size)

    def forward(self, x):
        return self.classifier(self.features(x))


class ConvClassNet(nn.Module):
    """The conv4 net written as a class: `self.features` (the blocks) and `self.classifier`, forward with
    `x.view(x.size(0), -1)`; the shape of the models in learn2learn's, higher's and TorchOpt's examples."""

    def __init__(self, ways=5, hidden=4, channels=1, side=1, blocks=2):
        super().__init__()
        layers, cin = [], channels
        for _ in range(blocks):
            layers += [nn.Conv2d(cin, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
            cin = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden * side * side, ways)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class ReadsTwice(nn.Module):
    """One value read by several nodes: h feeds two heads and a residual; x is read twice."""

    def __init__(self, din=3, dh=5, dout=2):
        super().__init__()
        self.inp = nn.Linear(din, dh)
        self.a = nn.Linear(dh, dout)
        self.b = nn.Linear(dh, dout)
        self.skip = nn.Linear(din, dout, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + 0.5 * h * 1.0  # h read twice by one add (through a constant scale)
        return self.a(h) - self.b(F.gelu(h)) + self.skip(x) / 2


class Concat(nn.Module):
    """Two branches concatenated along the feature dim, then a head; `torch.flatten` on conv features."""

    def __init__(self, ways=3):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(1, 3, 1)
        self.head = nn.Linear(5 * 4 * 4, ways)

    def forward(self, x):
        y = torch.cat([F.relu(self.c1(x)), torch.sigmoid(self.c2(x))], dim=1)
        y = F.avg_pool2d(y, 2)
        return self.head(torch.flatten(y, 1))


class Squeezes(nn.Module):
    """Feature reshapes users write: a global average pool `squeeze`d to [N, C], a sum over a feature dim
    after `unsqueeze`/`view`, and `torch.sum` over spatial dims."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, ways)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        pooled = F.avg_pool2d(x, 4).squeeze(-1).squeeze(-1)  # [N, 4]
        halves = pooled.unsqueeze(1).view(x.size(0), 2, 2).sum(1)  # [N, 2]
        spatial = torch.sum(x, dim=(2, 3)) / 16.0  # [N, 4]
        return self.head(spatial + torch.cat([halves, halves], dim=1) + pooled.squeeze(dim=(-1,)))


class BasicBlock(nn.Module):
    """learn2learn's ResNet-12 block (DropBlock off): three conv3×3-BN (LeakyReLU 0.1 after the first two),
    a 1×1 conv + BN shortcut, `out += residual`, LeakyReLU, MaxPool2d(2)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.maxpool = nn.MaxPool2d(2)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.num_batches_tracked = 0

    def forward(self, x):
        self.num_batches_tracked += 1  # learn2learn's block counts its calls (for DropBlock's schedule)
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.downsample(x)
        out += residual
        out = self.relu(out)
        return self.maxpool(out)


class ResNet12(nn.Module):
    def __init__(self, ways=3, widths=(3, 4, 5, 6)):
        super().__init__()
        blocks, cin = [], 3
        for w in widths:
            blocks.append(BasicBlock(cin, w))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1], ways)

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class WideBlock(nn.Module):
    """A Wide ResNet block as learn2learn's WRN28 (after FEAT's code) writes it: pre-activation BN-ReLU-conv
    twice, dropout (p=0) between, the shortcut an empty `nn.Sequential` (identity) or a strided 1×1 conv,
    `out += self.shortcut(x)`."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.dropout = nn.Dropout(p=0.0)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out += self.shortcut(x)
        return out


class WideResNet(nn.Module):
    """WRN-(6n+4)-k: a 3×3 stem, three stages of n WideBlocks (strides 1, 2, 2), BN-ReLU, `F.avg_pool2d`
    over the whole map, `view(x.size(0), -1)`, a Linear head. Small widths here (WRN-28-10 is 16-160-320-640)."""

    def __init__(self, ways=3, depth=10, widths=(2, 3, 4, 5), pool=4):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1)
        stages, cin = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, width, stride if j == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.9)
        self.pool = pool
        self.classifier = nn.Linear(cin, ways)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.avg_pool2d(out, self.pool)
        return self.classifier(out.view(out.size(0), -1))
