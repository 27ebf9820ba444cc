"""Functions for the payload tests, in a module the hosts do not have (pickled by value).

The first four are the examples of the Clustrix tutorial (numerical work, a loop, a
closure over local state, a function using an imported module).
"""

import math


def monte_carlo_pi(samples):
    import random
    rng = random.Random(1234)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1)
    return 4.0 * inside / samples


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def make_scaler(factor):
    def scale(xs):
        return [x * factor for x in xs]
    return scale


def hypot_table(n):
    return [round(math.hypot(i, i + 1), 6) for i in range(n)]


def chatty(n):
    import time
    for i in range(n):
        print("step", i, flush=True)
        time.sleep(0.5)
    return n


def fails(message):
    def inner():
        raise ValueError(message)
    inner()


def sleepy(seconds):
    import time
    time.sleep(seconds)
    return seconds
