"""Writes examples/houses.csv and examples/digits.csv. houses.csv: 2,000 synthetic house sales (a regression target, `price`, in
thousands) with a few missing values, the way real exports look.

    python examples/make_examples.py    # already run: the CSVs are in the repository
"""

from pathlib import Path

import numpy as np

rng = np.random.default_rng(7)
n = 2000
area = rng.uniform(40, 250, n).round(1)
rooms = np.clip((area / 30 + rng.normal(0, 1, n)).round(), 1, 9)
age = rng.integers(0, 80, n)
dist = rng.gamma(2.0, 4.0, n).round(2)
city = rng.choice(["north", "south", "east"], n)
price = 50 + 2.1 * area + 12 * rooms - 0.8 * age - 3.5 * dist + np.select(
    [city == "north", city == "south"], [40, -15], 0
) + rng.normal(0, 15, n)
lines = ["area,rooms,age,distance_km,price"]
for i in range(n):
    a = "" if i % 397 == 5 else f"{area[i]}"  # a few missing values: dropped (or imputed) and counted
    lines.append(f"{a},{int(rooms[i])},{age[i]},{dist[i]},{price[i]:.1f}")
Path(__file__).with_name("houses.csv").write_text("\n".join(lines) + "\n")

# examples/digits.csv: 20 of scikit-learn's 8x8 digits as 64 pixel columns, for `hpcml predict`
from sklearn.datasets import load_digits  # noqa: E402

digits = load_digits()
rows = [",".join(f"px{j}" for j in range(64))]
rows += [",".join(str(int(v)) for v in digits.data[i]) for i in range(20)]
Path(__file__).with_name("digits.csv").write_text("\n".join(rows) + "\n")

# examples/houses-new.csv: 10 houses without a price, to predict (complete rows: predict refuses gaps)
rows = ["area,rooms,age,distance_km"]
rows += [f"{area[i]},{int(rooms[i])},{age[i]},{dist[i]}" for i in range(n - 10, n)]
Path(__file__).with_name("houses-new.csv").write_text("\n".join(rows) + "\n")
