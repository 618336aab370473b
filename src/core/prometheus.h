// Prometheus metrics: a registry of counter, gauge and histogram families (optionally labelled)
// and render() to the text exposition format, version 0.0.4, which is what GET /metrics returns.
// Not here: the HTTP server, summaries, exemplars, timestamps, the OpenMetrics format.
// Thread safety: one mutex per family guards its children and their values. Updates hold it for a
// few instructions; render() holds it once per family, so each family is a consistent snapshot (a
// histogram's buckets, _sum and _count agree) though two families may be from different instants.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

template <class Metric>
class Family;

// Monotonic. By Prometheus convention a counter's name ends in `_total`; this is not enforced.
class Counter {
 public:
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;
  void add(double v = 1.0);  // v >= 0 (not NaN), else a check error
  double value() const;

 private:
  template <class>
  friend class Family;
  explicit Counter(std::mutex& mu) : mu_(mu) {}
  void render_locked(std::string& out, const std::string& name, const std::string& labels) const;

  std::mutex& mu_;  // the family's
  double value_ = 0.0;
};

class Gauge {
 public:
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;
  void set(double v);
  void add(double v);  // may be negative
  double value() const;

 private:
  template <class>
  friend class Family;
  explicit Gauge(std::mutex& mu) : mu_(mu) {}
  void render_locked(std::string& out, const std::string& name, const std::string& labels) const;

  std::mutex& mu_;
  double value_ = 0.0;
};

// Buckets are upper bounds (an observation v lands in the first bucket with v <= bound); the
// implicit last bucket is +Inf, which also takes NaN. Rendered cumulatively, as the format wants.
class Histogram {
 public:
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;
  void observe(double v);
  uint64_t count() const;
  double sum() const;

 private:
  template <class>
  friend class Family;
  Histogram(std::mutex& mu, const std::vector<double>& bounds)
      : mu_(mu), bounds_(bounds), bucket_counts_(bounds.size() + 1, 0) {}
  void render_locked(std::string& out, const std::string& name, const std::string& labels) const;

  std::mutex& mu_;
  const std::vector<double>& bounds_;    // the family's, strictly increasing and finite
  std::vector<uint64_t> bucket_counts_;  // per bucket, not cumulative; last is +Inf
  double sum_ = 0.0;
  uint64_t count_ = 0;
};

// What the registry keeps: name, help, type, label names, and the rendering under the lock.
class MetricFamily {
 public:
  virtual ~MetricFamily() = default;
  const std::string& name() const { return name_; }
  // Appends `# HELP`, `# TYPE` and every child's samples, taken under this family's mutex.
  void render(std::string& out) const;

 protected:
  MetricFamily(std::string name, std::string help, std::string type,
               std::vector<std::string> label_names);
  virtual void render_samples_locked(std::string& out) const = 0;

  std::string name_;
  std::string help_;
  std::string type_;
  std::vector<std::string> label_names_;
  mutable std::mutex mu_;
};

// Children are created on first use of their label values and live as long as the registry, so
// the reference labels() returns may be kept (look it up once, not on every update). Children
// render in lexicographic order of their label values.
template <class Metric>
class Family final : public MetricFamily {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> bounds);
  // One value per label name, in the order the names were given; else a check error.
  Metric& labels(const std::vector<std::string>& values);
  Metric& get() { return labels({}); }  // for a family without label names

 private:
  void render_samples_locked(std::string& out) const override;

  std::vector<double> bounds_;  // histograms only; empty for counters and gauges
  std::map<std::vector<std::string>, std::unique_ptr<Metric>> children_;
};

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;
using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

// Owns the families; they render in registration order. Names follow the Prometheus rules (metric
// [a-zA-Z_:][a-zA-Z0-9_:]*, label [a-zA-Z_][a-zA-Z0-9_]* not starting with "__", histograms may
// not use "le"); a bad or duplicate name is a check error, since names are fixed in code.
class MetricsRegistry {
 public:
  CounterFamily& add_counter(const std::string& name, const std::string& help,
                             const std::vector<std::string>& label_names = {});
  GaugeFamily& add_gauge(const std::string& name, const std::string& help,
                         const std::vector<std::string>& label_names = {});
  // bounds: strictly increasing and finite (+Inf is implicit); may be empty.
  HistogramFamily& add_histogram(const std::string& name, const std::string& help,
                                 const std::vector<double>& bounds,
                                 const std::vector<std::string>& label_names = {});
  std::string render() const;

 private:
  void check_new_name(const std::string& name) const;  // call with mu_ held

  mutable std::mutex mu_;  // guards families_; taken before any family's mutex, never after
  std::vector<std::unique_ptr<MetricFamily>> families_;
};

// count bounds start, start*factor, ... (start > 0, factor > 1): e.g. latencies from 1 ms.
std::vector<double> exponential_buckets(double start, double factor, int count);

// A sample value as the format wants it: shortest round-trip decimal, "+Inf", "-Inf", "NaN".
std::string prometheus_value(double v);

}  // namespace tessera
