"""Float64 NumPy building blocks shared by the loss tests' independent re-statements."""
import numpy as np


def np_log_softmax(row):
  """log softmax of a 1-d array, shifted by its maximum for stability."""
  shifted = row - row.max()
  return shifted - np.log(np.sum(np.exp(shifted)))


def numeric_grad(fn, x, eps=1e-6):
  """Central-difference gradient of the scalar function fn at x (float64, same shape as x)."""
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[index] += eps
    minus[index] -= eps
    grad[index] = (fn(plus) - fn(minus)) / (2 * eps)
  return grad
