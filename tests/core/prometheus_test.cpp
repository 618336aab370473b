// Prometheus registry: exact exposition text, escaping, value formatting, the check errors for bad
// names/labels/buckets/increments, child order, and updates from several threads during render().
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <charconv>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/prometheus.h"

namespace tessera {
namespace {

// Runs f and expects a check-tier (bug) error whose message contains `needle`.
template <class F>
void expect_check_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bug) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Prometheus, RendersSmallRegistryExactly) {
  MetricsRegistry reg;
  CounterFamily& requests =
      reg.add_counter("tessera_requests_total", "Requests by status.", {"status"});
  GaugeFamily& running = reg.add_gauge("tessera_running_requests", "Requests running.");
  HistogramFamily& ttft =
      reg.add_histogram("tessera_ttft_seconds", "Time to first token.", {0.1, 0.5, 1});
  requests.labels({"503"}).add();
  requests.labels({"200"}).add(2);
  requests.labels({"200"}).add();
  running.get().set(4);
  // 0.1 sits on a bound and belongs to it (le = less or equal); 2 only reaches +Inf.
  for (double v : {0.0625, 0.1, 0.25, 2.0}) ttft.get().observe(v);
  const std::string expected =
      "# HELP tessera_requests_total Requests by status.\n"
      "# TYPE tessera_requests_total counter\n"
      "tessera_requests_total{status=\"200\"} 3\n"
      "tessera_requests_total{status=\"503\"} 1\n"
      "# HELP tessera_running_requests Requests running.\n"
      "# TYPE tessera_running_requests gauge\n"
      "tessera_running_requests 4\n"
      "# HELP tessera_ttft_seconds Time to first token.\n"
      "# TYPE tessera_ttft_seconds histogram\n"
      "tessera_ttft_seconds_bucket{le=\"0.1\"} 2\n"
      "tessera_ttft_seconds_bucket{le=\"0.5\"} 3\n"
      "tessera_ttft_seconds_bucket{le=\"1\"} 3\n"
      "tessera_ttft_seconds_bucket{le=\"+Inf\"} 4\n"
      "tessera_ttft_seconds_sum 2.4125\n"
      "tessera_ttft_seconds_count 4\n";
  EXPECT_EQ(reg.render(), expected);
  EXPECT_EQ(ttft.get().count(), 4u);
  EXPECT_EQ(requests.labels({"200"}).value(), 3.0);
}

TEST(Prometheus, LabelledHistogramPutsLeLast) {
  MetricsRegistry reg;
  HistogramFamily& h = reg.add_histogram("itl_seconds", "h", {1}, {"model", "phase"});
  h.labels({"m", "decode"}).observe(0.5);
  h.labels({"m", "decode"}).observe(-3);  // below every bound: the first bucket
  const std::string expected =
      "# HELP itl_seconds h\n"
      "# TYPE itl_seconds histogram\n"
      "itl_seconds_bucket{model=\"m\",phase=\"decode\",le=\"1\"} 2\n"
      "itl_seconds_bucket{model=\"m\",phase=\"decode\",le=\"+Inf\"} 2\n"
      "itl_seconds_sum{model=\"m\",phase=\"decode\"} -2.5\n"
      "itl_seconds_count{model=\"m\",phase=\"decode\"} 2\n";
  EXPECT_EQ(reg.render(), expected);
}

TEST(Prometheus, EscapesHelpAndLabelValues) {
  MetricsRegistry reg;
  CounterFamily& c = reg.add_counter("x_total", "a \\ b\nc \"q\"", {"path"});
  c.labels({"C:\\dir\n\"quoted\""}).add();
  // HELP escapes backslash and newline but leaves quotes; label values escape all three.
  const std::string expected =
      "# HELP x_total a \\\\ b\\nc \"q\"\n"
      "# TYPE x_total counter\n"
      "x_total{path=\"C:\\\\dir\\n\\\"quoted\\\"\"} 1\n";
  EXPECT_EQ(reg.render(), expected);
}

TEST(Prometheus, FormatsValuesSoTheyRoundTrip) {
  EXPECT_EQ(prometheus_value(0), "0");
  EXPECT_EQ(prometheus_value(3), "3");
  EXPECT_EQ(prometheus_value(-42), "-42");
  EXPECT_EQ(prometheus_value(123456789), "123456789");
  EXPECT_EQ(prometheus_value(800000), "800000");  // not the shorter 8e+05
  EXPECT_EQ(prometheus_value(1e20), "1e+20");
  EXPECT_EQ(prometheus_value(0.1), "0.1");
  EXPECT_EQ(prometheus_value(1e-9), "1e-09");
  EXPECT_EQ(prometheus_value(INFINITY), "+Inf");
  EXPECT_EQ(prometheus_value(-INFINITY), "-Inf");
  EXPECT_EQ(prometheus_value(NAN), "NaN");
  // Parse back with from_chars: std::stod throws on the subnormal 5e-324.
  for (double v : {0.1 + 0.2, 1.0 / 3.0, 6.02214076e23, 5e-324, -1e300}) {
    const std::string text = prometheus_value(v);
    double back = 0;
    std::from_chars(text.data(), text.data() + text.size(), back);
    EXPECT_EQ(back, v) << text;
  }
  // Gauges carry such values into the text unchanged.
  MetricsRegistry reg;
  reg.add_gauge("loss_scale", "s").get().set(INFINITY);
  EXPECT_NE(reg.render().find("\nloss_scale +Inf\n"), std::string::npos) << reg.render();
}

TEST(Prometheus, InvalidNamesAreCheckErrors) {
  MetricsRegistry reg;
  expect_check_error([&] { reg.add_counter("", "h"); }, "metric name");
  expect_check_error([&] { reg.add_counter("1abc", "h"); }, "metric name '1abc'");
  expect_check_error([&] { reg.add_gauge("a-b", "h"); }, "metric name 'a-b'");
  expect_check_error([&] { reg.add_gauge("g", "h", {"bad-label"}); }, "label name 'bad-label'");
  expect_check_error([&] { reg.add_gauge("g", "h", {"__reserved"}); }, "label name '__reserved'");
  expect_check_error([&] { reg.add_gauge("g", "h", {"a:b"}); }, "label name 'a:b'");
  expect_check_error([&] { reg.add_gauge("g", "h", {"x", "x"}); }, "given twice");
  expect_check_error([&] { reg.add_histogram("hist", "h", {1}, {"le"}); }, "'le' is reserved");
  // Valid edge cases: colons in metric names, a single underscore, digits after the first char.
  reg.add_gauge("ns:sub_metric:rate5m", "h", {"_", "l0"});
  reg.add_counter("dup_total", "h");
  expect_check_error([&] { reg.add_gauge("dup_total", "h"); }, "registered twice");
  // A refused registration leaves nothing behind.
  EXPECT_EQ(reg.render().find("hist"), std::string::npos);
}

TEST(Prometheus, InvalidBucketsAreCheckErrors) {
  MetricsRegistry reg;
  expect_check_error([&] { reg.add_histogram("h1", "h", {1, 1}); }, "strictly increasing");
  expect_check_error([&] { reg.add_histogram("h2", "h", {2, 1}); }, "strictly increasing");
  expect_check_error([&] { reg.add_histogram("h3", "h", {1, INFINITY}); }, "not finite");
  expect_check_error([&] { reg.add_histogram("h4", "h", {NAN}); }, "not finite");
  HistogramFamily& only_inf = reg.add_histogram("h5", "h", {});
  only_inf.get().observe(NAN);  // NaN lands in +Inf
  EXPECT_NE(reg.render().find("h5_bucket{le=\"+Inf\"} 1\nh5_sum NaN\nh5_count 1\n"),
            std::string::npos)
      << reg.render();
  EXPECT_EQ(exponential_buckets(0.001, 2, 3), (std::vector<double>{0.001, 0.002, 0.004}));
  expect_check_error([] { exponential_buckets(1, 1, 3); }, "factor");
}

TEST(Prometheus, BadIncrementsAndLabelCountsAreCheckErrors) {
  MetricsRegistry reg;
  CounterFamily& c = reg.add_counter("c_total", "h", {"a", "b"});
  expect_check_error([&] { c.labels({"x"}); }, "1 label values for 2 label names");
  expect_check_error([&] { c.labels({"x", "y", "z"}); }, "3 label values");
  expect_check_error([&] { c.get(); }, "0 label values");
  Counter& child = c.labels({"x", "y"});
  expect_check_error([&] { child.add(-1); }, ">= 0");
  expect_check_error([&] { child.add(NAN); }, ">= 0");
  child.add(0);
  EXPECT_EQ(child.value(), 0.0);
  // Gauges may go down.
  Gauge& g = reg.add_gauge("g", "h").get();
  g.add(5);
  g.add(-7);
  EXPECT_EQ(g.value(), -2.0);
}

TEST(Prometheus, ChildOrderIsByLabelValuesNotCreation) {
  auto render_with = [](const std::vector<std::vector<std::string>>& order) {
    MetricsRegistry reg;
    GaugeFamily& g = reg.add_gauge("kv_blocks", "h", {"pool", "state"});
    for (const auto& values : order) g.labels(values).set(1);
    return reg.render();
  };
  const std::string a = render_with({{"b", "used"}, {"a", "used"}, {"b", "free"}, {"a", "free"}});
  const std::string b = render_with({{"a", "free"}, {"b", "free"}, {"a", "used"}, {"b", "used"}});
  EXPECT_EQ(a, b);
  const std::string expected =
      "# HELP kv_blocks h\n"
      "# TYPE kv_blocks gauge\n"
      "kv_blocks{pool=\"a\",state=\"free\"} 1\n"
      "kv_blocks{pool=\"a\",state=\"used\"} 1\n"
      "kv_blocks{pool=\"b\",state=\"free\"} 1\n"
      "kv_blocks{pool=\"b\",state=\"used\"} 1\n";
  EXPECT_EQ(a, expected);
}

// Several writers bump a counter, a histogram and create new children while a reader renders;
// totals must be exact and every rendered histogram must be self-consistent.
TEST(Prometheus, ConcurrentUpdatesSumWhileRendering) {
  MetricsRegistry reg;
  CounterFamily& tokens = reg.add_counter("tokens_total", "h", {"kind"});
  HistogramFamily& lat = reg.add_histogram("lat_seconds", "h", {0.5});
  constexpr int kNumThreads = 4;
  constexpr int kNumIncrements = 200000;
  std::atomic<bool> done{false};
  std::atomic<int> num_renders{0};
  std::thread reader([&] {
    while (!done.load()) {
      const std::string text = reg.render();
      // The +Inf bucket and _count come from one snapshot, so they agree.
      const size_t inf_pos = text.find("lat_seconds_bucket{le=\"+Inf\"} ");
      const size_t count_pos = text.find("lat_seconds_count ");
      ASSERT_NE(inf_pos, std::string::npos);
      ASSERT_NE(count_pos, std::string::npos);
      const std::string inf_value =
          text.substr(inf_pos + 30, text.find('\n', inf_pos) - inf_pos - 30);
      const std::string count_value =
          text.substr(count_pos + 18, text.find('\n', count_pos) - count_pos - 18);
      EXPECT_EQ(inf_value, count_value);
      num_renders.fetch_add(1);
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kNumThreads; ++t) {
    writers.emplace_back([&, t] {
      Counter& shared = tokens.labels({"generated"});
      for (int i = 0; i < kNumIncrements; ++i) {
        shared.add();
        lat.get().observe(i % 2 == 0 ? 0.25 : 1.0);
        if (i % 1000 == 0) tokens.labels({fmt::format("t{}_{}", t, i)}).add();
      }
    });
  }
  for (auto& w : writers) w.join();
  done.store(true);
  reader.join();
  EXPECT_GT(num_renders.load(), 0);
  EXPECT_EQ(tokens.labels({"generated"}).value(), double(kNumThreads) * kNumIncrements);
  EXPECT_EQ(lat.get().count(), uint64_t(kNumThreads) * kNumIncrements);
  const std::string text = reg.render();
  EXPECT_NE(text.find("tokens_total{kind=\"generated\"} 800000\n"), std::string::npos);
  EXPECT_NE(text.find("lat_seconds_bucket{le=\"0.5\"} 400000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("lat_seconds_sum 500000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("tokens_total{kind=\"t3_199000\"} 1\n"), std::string::npos);
}

}  // namespace
}  // namespace tessera
