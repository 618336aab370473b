// Prometheus registry and text exposition (format 0.0.4): name checks, escaping, value
// formatting, and per-family rendering under the family's mutex. See prometheus.h for the locking.
#include "core/prometheus.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <type_traits>
#include <utility>

#include "core/error.h"

namespace tessera {
namespace {

bool is_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

bool valid_metric_name(const std::string& s) {
  if (s.empty() || !(is_letter(s[0]) || s[0] == ':')) return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return is_letter(c) || is_digit(c) || c == ':'; });
}

bool valid_label_name(const std::string& s) {
  if (s.empty() || !is_letter(s[0]) || s.starts_with("__")) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return is_letter(c) || is_digit(c); });
}

// HELP text escapes backslash and newline; label values also escape the double quote.
std::string escape(std::string_view s, bool quote) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else if (quote && c == '"')
      out += "\\\"";
    else
      out += c;
  }
  return out;
}

// `l1="v1",l2="v2"` without braces, so a histogram can append its `le`.
std::string format_labels(const std::vector<std::string>& names,
                          const std::vector<std::string>& values) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i];
    out += "=\"";
    out += escape(values[i], /*quote=*/true);
    out += '"';
  }
  return out;
}

void append_sample(std::string& out, const std::string& name, std::string_view suffix,
                   const std::string& labels, double v) {
  out += name;
  out += suffix;
  if (!labels.empty()) {
    out += '{';
    out += labels;
    out += '}';
  }
  out += ' ';
  out += prometheus_value(v);
  out += '\n';
}

}  // namespace

std::string prometheus_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  // Shortest representation that parses back to the same double (e.g. 0.1, 1e-09). Whole numbers
  // below 1e15 (counts, token totals) stay in plain digits: the shortest form of 800000 is 8e+05.
  const bool whole = v == std::trunc(v) && std::fabs(v) < 1e15;
  auto [end, ec] = whole ? std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed)
                         : std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) TS_BUG("to_chars failed for a finite double");
  return std::string(buf, end);
}

std::vector<double> exponential_buckets(double start, double factor, int count) {
  TS_CHECK(start > 0 && factor > 1 && count >= 1, "start {} factor {} count {}", start, factor,
           count);
  std::vector<double> bounds;
  double b = start;
  for (int i = 0; i < count; ++i, b *= factor) bounds.push_back(b);
  return bounds;
}

// ---- metrics ----

void Counter::add(double v) {
  // v >= 0 is false for NaN too, so NaN is refused: it would poison the total forever.
  TS_CHECK(v >= 0, "counter increment must be >= 0, got {}", v);
  std::lock_guard lock(mu_);
  value_ += v;
}

double Counter::value() const {
  std::lock_guard lock(mu_);
  return value_;
}

void Counter::render_locked(std::string& out, const std::string& name,
                            const std::string& labels) const {
  append_sample(out, name, "", labels, value_);
}

void Gauge::set(double v) {
  std::lock_guard lock(mu_);
  value_ = v;
}

void Gauge::add(double v) {
  std::lock_guard lock(mu_);
  value_ += v;
}

double Gauge::value() const {
  std::lock_guard lock(mu_);
  return value_;
}

void Gauge::render_locked(std::string& out, const std::string& name,
                          const std::string& labels) const {
  append_sample(out, name, "", labels, value_);
}

void Histogram::observe(double v) {
  // First bound with v <= bound; NaN compares false everywhere and so falls through to +Inf.
  auto it =
      std::partition_point(bounds_.begin(), bounds_.end(), [v](double b) { return !(v <= b); });
  const size_t bucket_idx = static_cast<size_t>(it - bounds_.begin());
  std::lock_guard lock(mu_);
  ++bucket_counts_[bucket_idx];
  sum_ += v;
  ++count_;
}

uint64_t Histogram::count() const {
  std::lock_guard lock(mu_);
  return count_;
}

double Histogram::sum() const {
  std::lock_guard lock(mu_);
  return sum_;
}

void Histogram::render_locked(std::string& out, const std::string& name,
                              const std::string& labels) const {
  const std::string sep = labels.empty() ? "" : ",";
  uint64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += bucket_counts_[i];
    const double le = i < bounds_.size() ? bounds_[i] : INFINITY;
    append_sample(out, name, "_bucket", labels + sep + "le=\"" + prometheus_value(le) + "\"",
                  static_cast<double>(cumulative));
  }
  append_sample(out, name, "_sum", labels, sum_);
  append_sample(out, name, "_count", labels, static_cast<double>(count_));
}

// ---- families ----

MetricFamily::MetricFamily(std::string name, std::string help, std::string type,
                           std::vector<std::string> label_names)
    : name_(std::move(name)),
      help_(std::move(help)),
      type_(std::move(type)),
      label_names_(std::move(label_names)) {
  TS_CHECK(valid_metric_name(name_), "metric name '{}' does not match [a-zA-Z_:][a-zA-Z0-9_:]*",
           name_);
  for (size_t i = 0; i < label_names_.size(); ++i) {
    const std::string& l = label_names_[i];
    TS_CHECK(valid_label_name(l),
             "metric {}: label name '{}' does not match [a-zA-Z_][a-zA-Z0-9_]* or starts with __",
             name_, l);
    TS_CHECK(type_ != "histogram" || l != "le", "histogram {}: label name 'le' is reserved", name_);
    for (size_t j = 0; j < i; ++j)
      TS_CHECK(label_names_[j] != l, "metric {}: label name '{}' given twice", name_, l);
  }
}

void MetricFamily::render(std::string& out) const {
  out += "# HELP " + name_ + " " + escape(help_, /*quote=*/false) + "\n";
  out += "# TYPE " + name_ + " " + type_ + "\n";
  std::lock_guard lock(mu_);
  render_samples_locked(out);
}

namespace {
template <class Metric>
const char* type_name();
template <>
const char* type_name<Counter>() {
  return "counter";
}
template <>
const char* type_name<Gauge>() {
  return "gauge";
}
template <>
const char* type_name<Histogram>() {
  return "histogram";
}
}  // namespace

template <class Metric>
Family<Metric>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                       std::vector<double> bounds)
    : MetricFamily(std::move(name), std::move(help), type_name<Metric>(), std::move(label_names)),
      bounds_(std::move(bounds)) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    TS_CHECK(std::isfinite(bounds_[i]), "histogram {}: bucket bound {} is not finite", name_,
             bounds_[i]);
    TS_CHECK(i == 0 || bounds_[i - 1] < bounds_[i],
             "histogram {}: bucket bounds must be strictly increasing, got {} then {}", name_,
             bounds_[i - 1], bounds_[i]);
  }
  // An unlabelled metric exists from the start, so a scrape shows 0 rather than nothing.
  if (label_names_.empty()) labels({});
}

template <class Metric>
Metric& Family<Metric>::labels(const std::vector<std::string>& values) {
  TS_CHECK(values.size() == label_names_.size(), "metric {}: {} label values for {} label names",
           name_, values.size(), label_names_.size());
  std::lock_guard lock(mu_);
  auto it = children_.find(values);
  if (it == children_.end()) {
    std::unique_ptr<Metric> child;
    if constexpr (std::is_same_v<Metric, Histogram>)
      child.reset(new Histogram(mu_, bounds_));
    else
      child.reset(new Metric(mu_));
    it = children_.emplace(values, std::move(child)).first;
  }
  return *it->second;
}

template <class Metric>
void Family<Metric>::render_samples_locked(std::string& out) const {
  for (const auto& [values, child] : children_)
    child->render_locked(out, name_, format_labels(label_names_, values));
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---- registry ----

void MetricsRegistry::check_new_name(const std::string& name) const {
  for (const auto& f : families_)
    TS_CHECK(f->name() != name, "metric family '{}' registered twice", name);
}

CounterFamily& MetricsRegistry::add_counter(const std::string& name, const std::string& help,
                                            const std::vector<std::string>& label_names) {
  std::lock_guard lock(mu_);
  check_new_name(name);
  auto family = std::make_unique<CounterFamily>(name, help, label_names, std::vector<double>{});
  CounterFamily& ref = *family;
  families_.push_back(std::move(family));
  return ref;
}

GaugeFamily& MetricsRegistry::add_gauge(const std::string& name, const std::string& help,
                                        const std::vector<std::string>& label_names) {
  std::lock_guard lock(mu_);
  check_new_name(name);
  auto family = std::make_unique<GaugeFamily>(name, help, label_names, std::vector<double>{});
  GaugeFamily& ref = *family;
  families_.push_back(std::move(family));
  return ref;
}

HistogramFamily& MetricsRegistry::add_histogram(const std::string& name, const std::string& help,
                                                const std::vector<double>& bounds,
                                                const std::vector<std::string>& label_names) {
  std::lock_guard lock(mu_);
  check_new_name(name);
  auto family = std::make_unique<HistogramFamily>(name, help, label_names, bounds);
  HistogramFamily& ref = *family;
  families_.push_back(std::move(family));
  return ref;
}

std::string MetricsRegistry::render() const {
  std::string out;
  std::lock_guard lock(mu_);
  for (const auto& f : families_) f->render(out);
  return out;
}

}  // namespace tessera
