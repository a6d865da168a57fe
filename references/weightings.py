"""Loss-weighting methods step by step in plain Python (floats and lists), from the papers' equations.

The oracle for metaweight's UW, DWA, GradNorm, RLW, FAMO and SDNSchedule: written from the
papers (and, for FAMO and SDN, the authors' code), independent of the library. Every function
takes the sequence of what the method observes and returns the weights it uses at each
iteration; "K" is the number of terms.
"""

import math


class Adam:
    """torch.optim.Adam on a list of floats (L2 weight decay added to the gradient)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.p = list(params)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = [0.0] * len(self.p)
        self.v = [0.0] * len(self.p)
        self.t = 0

    def step(self, grad):
        self.t += 1
        for i, g in enumerate(grad):
            g = g + self.wd * self.p[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** self.t)
            v_hat = self.v[i] / (1 - self.b2 ** self.t)
            self.p[i] -= self.lr * m_hat / (math.sqrt(v_hat) + self.eps)
        return self.p


def softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def uw(losses, lr=0.01):
    """Kendall et al. 2018, classification form: loss = sum exp(-s_k) L_k + s_k / 2, s_k trained by Adam
    from 0. Returns the weights exp(-s_k) used at each iteration (one more than len(losses))."""
    K = len(losses[0])
    s = [0.0] * K
    opt = Adam(s, lr)
    out = [[math.exp(-v) for v in s]]
    for L in losses:
        grad = [0.5 - math.exp(-s[k]) * L[k] for k in range(K)]  # d/ds_k of exp(-s_k) L_k + s_k / 2
        s = opt.step(grad)
        out.append([math.exp(-v) for v in s])
    return out


def dwa(losses, window, temperature=2.0):
    """Liu et al. 2019, Eq. 7: the weights of each iteration; window t's weights come from the averages of
    windows t-1 and t-2 (1 for the first two windows). Where the paper's rate divides by an average of 0, the
    library's rule: the rate is 1."""
    K = len(losses[0])
    averages = []
    out = []
    weights = [1.0] * K
    for i in range(0, len(losses) + 1):
        out.append(list(weights))
        if i == len(losses):
            break
        if (i + 1) % window == 0:
            chunk = losses[i + 1 - window:i + 1]
            averages.append([sum(L[k] for L in chunk) / window for k in range(K)])
            if len(averages) >= 2:
                r = [averages[-1][k] / averages[-2][k] if averages[-2][k] != 0 else 1.0 for k in range(K)]
                weights = [K * v for v in softmax([x / temperature for x in r])]
    return out


def rlw(draws):
    """Lin et al. 2022: the softmax of each iteration's standard-normal draws."""
    return [softmax(list(d)) for d in draws]


def famo(before, after, lr=0.025, weight_decay=1e-3, min_losses=None, eps=1e-8):
    """Liu et al. 2023 (official famo.py): logits xi from 0, z = softmax(xi); after each step,
    delta_k = log(before_k - min_k + eps) - log(after_k - min_k + eps), the gradient of xi is
    J_softmax(xi)^T delta, and xi takes an Adam step (lr, L2 weight_decay). Returns z of every iteration
    and the effective weights z_k / (c D_k), c = sum z_k / D_k, of the losses ``before``."""
    K = len(before[0])
    m = min_losses or [0.0] * K
    xi = [0.0] * K
    opt = Adam(xi, lr, weight_decay=weight_decay)
    zs, effective = [softmax(xi)], []
    for b, a in zip(before, after):
        z = softmax(xi)
        D = [b[k] - m[k] + eps for k in range(K)]
        c = sum(z[k] / D[k] for k in range(K))
        effective.append([z[k] / (c * D[k]) for k in range(K)])
        delta = [math.log(b[k] - m[k] + eps) - math.log(a[k] - m[k] + eps) for k in range(K)]
        zd = sum(z[k] * delta[k] for k in range(K))
        grad = [z[k] * (delta[k] - zd) for k in range(K)]  # sum_j dz_j/dxi_k delta_j
        xi = opt.step(grad)
        zs.append(softmax(xi))
    return zs, effective


def gradnorm(losses, norms, alpha=1.5, lr=0.01):
    """Chen et al. 2018, Alg. 1: w from 1; each iteration G_k = w_k ||grad_W L_k||, target
    mean(G) * r_k^alpha held constant, r_k = (L_k/L_k(0)) / mean_i(L_i/L_i(0)); w takes an Adam step on
    d/dw_k sum |G_k - target_k| = sign(G_k - target_k) ||grad_W L_k||, is clamped at 0 and renormalised to
    sum to K. Returns the weights of every iteration. Where the paper's L_k(0) is 0 (its rate undefined), the
    library's rule: r_k = 1, and the mean of the rates is over the other terms."""
    K = len(losses[0])
    w = [1.0] * K
    opt = Adam(w, lr)
    out = [list(w)]
    initial = losses[0]
    known = [k for k in range(K) if initial[k] != 0]
    for L, n in zip(losses, norms):
        ratio = {k: L[k] / initial[k] for k in known}
        mean_ratio = sum(ratio.values()) / max(len(known), 1)
        G = [w[k] * n[k] for k in range(K)]
        mean_G = sum(G) / K
        target = [mean_G * ((ratio[k] / mean_ratio) ** alpha if k in known else 1.0) for k in range(K)]
        grad = [(1.0 if G[k] > target[k] else -1.0 if G[k] < target[k] else 0.0) * n[k] for k in range(K)]
        w = opt.step(grad)
        w = [max(v, 0.0) for v in w]
        total = sum(w)
        w = [K * v / total for v in w]
        opt.p = w
        out.append(list(w))
    return out


def sdn(max_weights, epochs, steps_per_epoch, iterations):
    """Kaya et al. 2019 (official sdn_train): in epoch e (from 1) internal classifier k has weight
    min(C_k, 0.01 + e C_k / E); None in ``max_weights`` marks a term held at 1."""
    out = []
    for t in range(iterations):
        e = 1 + t // steps_per_epoch
        out.append([1.0 if c is None else min(c, 0.01 + e * c / epochs) for c in max_weights])
    return out
