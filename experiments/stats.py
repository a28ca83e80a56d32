"""The statistics every study uses: a summary of one arm (mean, std, 95% interval), Welch's t-test
between two arms, and the epochs at which one arm reaches another's mean, with a bootstrap interval.
Plain Python: the experiments need nothing beyond torch."""
import math
import random


def mean(values):
    return sum(values) / len(values)


def std(values):
    """Sample standard deviation (n - 1 in the denominator); nan for fewer than two values."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _incomplete_beta(x, a, b):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use symmetry
        return 1 - _incomplete_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + numerator * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + numerator / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


def t_cdf(t, df):
    """P(T <= t) for Student's t distribution with df degrees of freedom (df may be fractional)."""
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p, by bisection (the CDF is monotone)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def summarize(values):
    """{'n', 'mean', 'std', 'ci95': (low, high)}: the 95% interval of the mean, from Student's t
    (nan where n < 2: one run says nothing about the spread)."""
    n, m, s = len(values), mean(values), std(values)
    half = t_quantile(0.975, n - 1) * s / math.sqrt(n) if n >= 2 else math.nan
    return {'n': n, 'mean': m, 'std': s, 'ci95': (m - half, m + half)}


def welch(a, b):
    """Welch's t-test of mean(a) != mean(b) without assuming equal variances.
    Returns {'difference': mean(a) - mean(b), 't', 'df', 'p'} (two-sided p; nan if either arm has
    fewer than two values, or both have no spread)."""
    difference = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return {'difference': difference, 't': math.nan, 'df': math.nan, 'p': math.nan}
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    if va + vb == 0:
        return {'difference': difference, 't': math.nan, 'df': math.nan, 'p': math.nan}
    t = difference / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {'difference': difference, 't': t, 'df': df, 'p': 2 * t_cdf(-abs(t), df)}


def epochs_to_match(curve, target):
    """The epochs at which an arm reaches mean(target): `curve` maps epoch budgets to that arm's accuracies,
    read by linear interpolation between neighbouring budgets (accuracy is concave in epochs, so between
    distant budgets this understates what the arm saves). -inf or inf where the goal lies outside the curve."""
    budgets = sorted(curve)
    means, goal = [mean(curve[b]) for b in budgets], mean(target)
    if goal < means[0]:
        return -math.inf
    for b0, b1, m0, m1 in zip(budgets, budgets[1:], means, means[1:]):
        if min(m0, m1) <= goal <= max(m0, m1):
            return b0 if m0 == m1 else b0 + (b1 - b0) * (goal - m0) / (m1 - m0)
    return math.inf


def bootstrap_interval(statistic, *samples, resamples=2000, seed=0):
    """95% percentile-bootstrap interval of statistic(*samples): each resample draws every list's runs with
    replacement, the same draw for lists of equal length (run i of each is seed i: paired seeds stay paired)."""
    rng, values = random.Random(seed), []
    for _ in range(resamples):
        draws = {}
        for n in (len(s) for s in samples):
            if n not in draws:
                draws[n] = [rng.randrange(n) for _ in range(n)]
        values.append(statistic(*[[s[i] for i in draws[len(s)]] for s in samples]))
    values.sort()
    return values[int(0.025 * resamples)], values[math.ceil(0.975 * resamples) - 1]
