"""A line-by-line transcription of the official MAE forward (facebookresearch/mae models_mae.py
with timm's Block), written against a fastmae model's parameters: the independent oracle the
model tests compare with. Only `noise` replaces torch.rand."""
import torch


def patchify(imgs, p, c):
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    x = imgs.reshape(shape=(imgs.shape[0], c, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * c))


def random_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def layer_norm(x, norm):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def attention(x, attn):
    # timm 0.3.2's Attention: explicit softmax, no fused kernel
    B, N, C = x.shape
    H = attn.num_heads
    qkv = (x @ attn.qkv.weight.t() + attn.qkv.bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    a = a.softmax(dim=-1)
    x = (a @ v).transpose(1, 2).reshape(B, N, C)
    return x @ attn.proj.weight.t() + attn.proj.bias


def block(x, blk):
    x = x + attention(layer_norm(x, blk.norm1), blk.attn)
    h = layer_norm(x, blk.norm2)
    h = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias)
    return x + (h @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias)


def unshuffle(x, mask_token, ids_restore, decoder_pos_embed):
    # forward_decoder's lines between decoder_embed and the blocks
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + decoder_pos_embed


def forward(m, imgs, mask_ratio, noise):
    p = m.patch_embed.proj.kernel_size[0]
    c = m.patch_embed.proj.in_channels
    # encoder
    x = torch.nn.functional.conv2d(imgs, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = x + m.pos_embed[:, 1:, :]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls_token = m.cls_token + m.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in m.blocks:
        x = block(x, blk)
    x = layer_norm(x, m.norm)
    # decoder
    x = x @ m.decoder_embed.weight.t() + m.decoder_embed.bias
    x = unshuffle(x, m.mask_token, ids_restore, m.decoder_pos_embed)
    for blk in m.decoder_blocks:
        x = block(x, blk)
    x = layer_norm(x, m.decoder_norm)
    x = x @ m.decoder_pred.weight.t() + m.decoder_pred.bias
    pred = x[:, 1:, :]
    # loss
    target = patchify(imgs, p, c)
    if m.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask
