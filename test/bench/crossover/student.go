package crossover

import "math"

// StudentTQuantile returns the p quantile of Student's t distribution with
// df degrees of freedom (df may be fractional, as Welch's are; +Inf is the
// standard normal), found by bisection on the distribution function.
func StudentTQuantile(p, df float64) float64 {
	switch {
	case math.IsNaN(p) || p <= 0 || p >= 1 || !(df > 0):
		return math.NaN()
	case p == 0.5:
		return 0
	case p < 0.5:
		return -StudentTQuantile(1-p, df)
	case math.IsInf(df, 1) || df > 1e7:
		return math.Sqrt2 * math.Erfinv(2*p-1)
	}
	lo, hi := 0.0, 1.0
	for StudentTCDF(hi, df) < p {
		lo, hi = hi, 2*hi
	}
	for range 200 {
		mid := (lo + hi) / 2
		if StudentTCDF(mid, df) < p {
			lo = mid
		} else {
			hi = mid
		}
		if hi-lo <= 1e-12*hi {
			break
		}
	}
	return (lo + hi) / 2
}

// StudentTCDF is the distribution function of Student's t with df degrees
// of freedom: for t ≥ 0, 1 − I_x(df/2, 1/2)/2 with x = df/(df+t²), I the
// regularized incomplete beta function.
func StudentTCDF(t, df float64) float64 {
	if t < 0 {
		return 1 - StudentTCDF(-t, df)
	}
	x := df / (df + t*t)
	return 1 - incompleteBeta(df/2, 0.5, x)/2
}

// incompleteBeta is the regularized incomplete beta function I_x(a, b),
// from its continued fraction (evaluated with the modified Lentz method),
// using the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction
// converges slowly.
func incompleteBeta(a, b, x float64) float64 {
	switch {
	case x <= 0:
		return 0
	case x >= 1:
		return 1
	}
	la, _ := math.Lgamma(a)
	lb, _ := math.Lgamma(b)
	lab, _ := math.Lgamma(a + b)
	front := math.Exp(lab - la - lb + a*math.Log(x) + b*math.Log1p(-x))
	if x > (a+1)/(a+b+2) {
		return 1 - front*betaFraction(b, a, 1-x)/b
	}
	return front * betaFraction(a, b, x) / a
}

// betaFraction evaluates the continued fraction of the incomplete beta
// function: 1/(1+ d1/(1+ d2/(1+ ...))), with d_{2m+1} = −(a+m)(a+b+m)x /
// ((a+2m)(a+2m+1)) and d_{2m} = m(b−m)x / ((a+2m−1)(a+2m)).
func betaFraction(a, b, x float64) float64 {
	const tiny = 1e-300
	c, d := 1.0, 1-(a+b)*x/(a+1)
	if math.Abs(d) < tiny {
		d = tiny
	}
	d = 1 / d
	f := d
	for m := 1; m <= 1000; m++ {
		fm := float64(m)
		for _, num := range []float64{
			fm * (b - fm) * x / ((a + 2*fm - 1) * (a + 2*fm)),
			-(a + fm) * (a + b + fm) * x / ((a + 2*fm) * (a + 2*fm + 1)),
		} {
			d = 1 + num*d
			if math.Abs(d) < tiny {
				d = tiny
			}
			c = 1 + num/c
			if math.Abs(c) < tiny {
				c = tiny
			}
			d = 1 / d
			f *= c * d
		}
		if math.Abs(c*d-1) < 1e-15 {
			break
		}
	}
	return f
}
