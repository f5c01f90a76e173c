"""VA-VAE codec: an LDM-layout state dict built by an encoder/decoder written here from the LDM
definition (taming / LightningDiT tokenizer/autoencoder.py: ResnetBlock, AttnBlock, padded stride-2
Downsample, nearest Upsample, attention at resolution 16 in encoder AND decoder) loads into diffusers'
AutoencoderKL and reproduces it; per-channel normalisation (latent_norm, latent_multiplier) round-trips;
a checkpoint of the wrong layout and a missing statistics file are refused in one sentence."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.latent_norm import ChannelNorm
from models.vae import VAVAE_FILENAME, LatentCodec, vae_identity
from util.errors import UserError


def gn(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class Resnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, -1).permute(0, 2, 1)
        k, v = self.k(h).reshape(b, c, -1), self.v(h).reshape(b, c, -1)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        return x + self.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww))


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = Resnet(c, c), Attn(c), Resnet(c, c)
    return mid


class LDMEncoder(nn.Module):
    def __init__(self, ch, ch_mult, blocks, z, resolution=256, attn_res=(16,)):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, res, cin = nn.ModuleList(), resolution, ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(blocks):
                stage.block.append(Resnet(cin, ch * mult))
                cin = ch * mult
                if res in attn_res:
                    stage.attn.append(Attn(cin))
            if level != len(ch_mult) - 1:
                stage.downsample, res = Down(cin), res // 2
            self.down.append(stage)
        self.mid, self.norm_out, self.conv_out = _mid(cin), gn(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMDecoder(nn.Module):
    def __init__(self, ch, ch_mult, blocks, z, resolution=256, attn_res=(16,)):
        super().__init__()
        cin, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in, self.mid = nn.Conv2d(z, cin, 3, padding=1), _mid(cin)
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(blocks + 1):
                stage.block.append(Resnet(cin, ch * ch_mult[level]))
                cin = ch * ch_mult[level]
                if res in attn_res:
                    stage.attn.append(Attn(cin))
            if level != 0:
                stage.upsample, res = Up(cin), res * 2
            self.up.insert(0, stage)
        self.norm_out, self.conv_out = gn(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    """VA-VAE's tokenizer at width 32: ch_mult (1, 1, 2, 2, 4), 2 res blocks, embed_dim = z_channels."""

    def __init__(self, embed_dim=32, ch=32):
        super().__init__()
        self.encoder = LDMEncoder(ch, (1, 1, 2, 2, 4), 2, embed_dim)
        self.decoder = LDMDecoder(ch, (1, 1, 2, 2, 4), 2, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def moments(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def _seeded(builder, seed=0):
    """PyTorch's default (random) conv init under a fixed seed; GroupNorms start at weight 1, bias 0."""
    torch.manual_seed(seed)
    return builder().eval()


@pytest.fixture(scope="module")
def vavae_folder(tmp_path_factory):
    """A folder laid out like huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2: weights + stats."""
    folder = tmp_path_factory.mktemp("vavae")
    reference = _seeded(LDMAutoencoderKL)
    state = dict(reference.state_dict())
    # The released file also carries the alignment head and the GAN loss; the codec drops them.
    state["linear_proj.weight"] = torch.zeros(4, 32, 1, 1)
    state["loss.discriminator.main.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, folder / VAVAE_FILENAME)
    gen = torch.Generator().manual_seed(7)
    mean, std = torch.randn(1, 32, 1, 1, generator=gen), torch.rand(1, 32, 1, 1, generator=gen) + 0.5
    torch.save({"mean": mean, "std": std}, folder / "latents_stats.pt")
    return folder, reference, mean, std


def test_vavae_converts_into_diffusers_and_matches_the_ldm_definition(vavae_folder):
    folder, reference, mean, std = vavae_folder
    codec = LatentCodec.load("vavae_f16d32", folder)
    assert codec.spec.channels == 32 and codec.spec.factor == 16
    assert codec.autoencoder.config.block_out_channels == (32, 32, 64, 64, 128)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got_mean, got_logvar = codec.encode_moments(images)
    with torch.no_grad():
        ref_mean, ref_logvar = reference.moments(images)
        ref_images = reference.decode(ref_mean).clamp(-1, 1)
    assert got_mean.shape == (2, 32, 2, 2)
    torch.testing.assert_close(got_mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_logvar, ref_logvar, rtol=1e-4, atol=1e-5)
    # Normalised with the released statistics, and decoded through the inverse.
    latents = codec.encode(images)
    torch.testing.assert_close(latents, (got_mean - mean) / std * 1.0)
    torch.testing.assert_close(codec.decode(latents), ref_images, rtol=1e-4, atol=1e-4)
    assert vae_identity("vavae_f16d32", folder).startswith(f"vavae_f16d32:{VAVAE_FILENAME}:sha256=")


def test_channel_norm_round_trip_and_official_formula():
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])
    norm = ChannelNorm(mean, std, multiplier=0.5)
    z = torch.tensor([[3.0, 0.0]]).reshape(1, 2, 1, 1)
    # (3 - 1) / 2 * 0.5 = 0.5 ; (0 + 2) / 0.5 * 0.5 = 2
    assert norm.normalize(z).flatten().tolist() == [0.5, 2.0]
    assert norm.denormalize(norm.normalize(z)).flatten().tolist() == [3.0, 0.0]
    scalar = ChannelNorm.scalar(0.2325, channels=2)
    x = torch.randn(2, 2, 3, 3)
    assert torch.equal(scalar.normalize(x), x * 0.2325) and torch.equal(scalar.denormalize(x), x / 0.2325)
    with pytest.raises(UserError, match="positive std"):
        ChannelNorm(mean, torch.tensor([1.0, 0.0]))


def test_stats_file_save_load_and_missing(tmp_path, vavae_folder):
    folder, _, mean, std = vavae_folder
    norm = ChannelNorm.load(folder / "latents_stats.pt")
    assert torch.equal(norm.mean, mean) and torch.equal(norm.std, std)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / VAVAE_FILENAME).write_bytes((folder / VAVAE_FILENAME).read_bytes())
    with pytest.raises(UserError, match=r"latents_stats\.pt.*util\.latent_stats"):
        LatentCodec.load("vavae_f16d32", bare)
    unnormalised = LatentCodec.load("vavae_f16d32", bare, require_stats=False)  # to compute the statistics
    images = torch.zeros(1, 3, 32, 32)
    torch.testing.assert_close(unnormalised.encode(images), unnormalised.encode_moments(images)[0])
    explicit = LatentCodec.load("vavae_f16d32", bare / VAVAE_FILENAME, latent_stats=folder / "latents_stats.pt")
    assert torch.equal(explicit.latent_norm.mean, mean)


def test_wrong_layout_is_refused_in_one_sentence(tmp_path):
    kl16_like = _seeded(lambda: LDMAutoencoderKL(embed_dim=16))
    torch.save({"state_dict": kl16_like.state_dict()}, tmp_path / VAVAE_FILENAME)
    with pytest.raises(UserError, match=r"16 latent channels .* needs 32 channels and ch_mult \(1, 1, 2, 2, 4\)"):
        LatentCodec.load("vavae_f16d32", tmp_path)
    with pytest.raises(UserError, match=r"vavae-imagenet256-f16d32-dinov2\.pt.*--vae_path"):
        LatentCodec.load("vavae_f16d32", tmp_path / "missing")
