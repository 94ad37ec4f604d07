// The stress program's oracle and checks (tools/stress; docs/RELIABILITY.md,
// "Stress"): the stress test is only as good as these, so they are tested
// here on their own, and shown to fail on wrong data: a context holding
// another version's rows, a version the oracle does not allow, a context
// missing or one the oracle never built.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "sqz/db.h"
#include "sqz/query.h"
#include "stress/content.h"
#include "stress/oracle.h"
#include "stress/verify.h"
#include "tests/test_util.h"

namespace sqz::stress {
namespace {

using sqz::testing::ScopedTempDir;

Record Rec(char type, uint64_t gen, const std::string& name) {
  Record r;
  r.type = type;
  r.gen = gen;
  r.name = name;
  r.text = r.ToLine();
  r.text.pop_back();
  return r;
}

TEST(StressOracle, RecordsRoundTrip) {
  for (const Record& r : {Rec('P', 7, "a b"), Rec('p', 7, "a"), Rec('D', 0, "x"), Rec('d', 0, "x"), Rec('F', 0, "x"),
                          Rec('R', 0, "x"), Rec('R', 9, "x"), Rec('W', 0, "3 1234 99")}) {
    Record back;
    std::string line = r.ToLine();
    ASSERT_EQ(line.back(), '\n');
    line.pop_back();
    ASSERT_TRUE(Record::Parse(line, &back).ok()) << line;
    EXPECT_EQ(back.type, r.type);
    EXPECT_EQ(back.gen, r.gen);
    EXPECT_EQ(back.name, r.name);
  }
  Record r;
  for (const char* bad : {"", "P", "P 0 a", "P x a", "P 7", "D ", "Q 1 a", "P  a", "p 99999999999999999999999 a"}) {
    EXPECT_FALSE(Record::Parse(bad, &r).ok()) << "'" << bad << "'";
  }
}

TEST(StressOracle, StateAllowsTheCommittedVersionAndTheOneInFlight) {
  OracleState s;
  EXPECT_EQ(s.Allowed("a"), std::set<uint64_t>{0});
  ASSERT_TRUE(s.Apply(Rec('P', 1, "a")).ok());
  EXPECT_EQ(s.Allowed("a"), (std::set<uint64_t>{0, 1}));
  EXPECT_FALSE(s.Apply(Rec('P', 2, "a")).ok()) << "two operations in flight on one name";
  EXPECT_FALSE(s.Apply(Rec('p', 2, "a")).ok()) << "ends another operation";
  ASSERT_TRUE(s.Apply(Rec('p', 1, "a")).ok());
  EXPECT_EQ(s.Allowed("a"), std::set<uint64_t>{1});
  ASSERT_TRUE(s.Apply(Rec('D', 0, "a")).ok());
  EXPECT_EQ(s.Allowed("a"), (std::set<uint64_t>{0, 1}));
  ASSERT_TRUE(s.Apply(Rec('F', 0, "a")).ok());  // the drop failed: still gen 1
  EXPECT_EQ(s.Allowed("a"), std::set<uint64_t>{1});
  ASSERT_TRUE(s.Apply(Rec('P', 5, "a")).ok());  // killed: resolved from the database
  EXPECT_FALSE(s.Apply(Rec('R', 4, "a")).ok()) << "resolved to a version not allowed";
  ASSERT_TRUE(s.Apply(Rec('R', 5, "a")).ok());
  EXPECT_EQ(s.Allowed("a"), std::set<uint64_t>{5});
  EXPECT_FALSE(s.Apply(Rec('R', 0, "a")).ok()) << "a settled name resolved to another version";
  EXPECT_EQ(s.max_gen(), 5u);
  EXPECT_EQ(s.puts_done(), 1);
  EXPECT_EQ(s.resolved(), 1);
}

TEST(StressOracle, WindowAllowsEveryVersionBetweenItsEnds) {
  OracleState s;
  ASSERT_TRUE(s.Apply(Rec('P', 1, "a")).ok());
  ASSERT_TRUE(s.Apply(Rec('p', 1, "a")).ok());
  Window w(s);
  EXPECT_EQ(w.Allowed("a"), std::set<uint64_t>{1});
  w.Add(Rec('D', 0, "a"));
  w.Add(Rec('d', 0, "a"));
  w.Add(Rec('P', 3, "a"));
  w.Add(Rec('P', 2, "b"));
  EXPECT_EQ(w.Allowed("a"), (std::set<uint64_t>{0, 1, 3}));
  EXPECT_EQ(w.Allowed("b"), (std::set<uint64_t>{0, 2}));
  EXPECT_EQ(w.Allowed("c"), std::set<uint64_t>{0});
  EXPECT_EQ(w.Names(), (std::set<std::string>{"a", "b"}));
}

TEST(StressOracle, LogSurvivesAKillInsideAWrite) {
  ScopedTempDir dir("sqz-oracle");
  const std::string path = dir.Sub("oracle.log");
  {
    LogWriter log;
    ASSERT_TRUE(log.Open(path).ok());
    EXPECT_EQ(log.NewGeneration(), 1u);
    ASSERT_TRUE(log.Append(Rec('P', 1, "a")).ok());
    ASSERT_TRUE(log.Append(Rec('p', 1, "a")).ok());
  }
  std::ofstream(path, std::ios::app) << "P 2 a";  // a writer killed in the middle of a line
  LogTail tail(path);
  OracleState s;
  std::vector<Record> records;
  ASSERT_TRUE(tail.Poll(&s, &records).ok());
  EXPECT_EQ(records.size(), 2u) << "the partial line is not a record";
  LogWriter log;
  ASSERT_TRUE(log.Open(path).ok());
  EXPECT_EQ(log.Get("a").committed, 1u);
  EXPECT_FALSE(log.Get("a").in_flight);
  EXPECT_EQ(log.NewGeneration(), 2u);
  ASSERT_TRUE(log.Append(Rec('D', 0, "a")).ok());  // starts on a line of its own
  records.clear();
  ASSERT_TRUE(tail.Poll(&s, &records).ok());
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].text, "D a");
  EXPECT_EQ(s.Allowed("a"), (std::set<uint64_t>{0, 1}));
}

TEST(StressContent, VersionsAreDeterministicAndDistinct) {
  const VersionSpec a = SpecOf("ctx-01", 7), b = SpecOf("ctx-01", 7), c = SpecOf("ctx-01", 8);
  EXPECT_EQ(a.n_tokens, b.n_tokens);
  EXPECT_EQ(a.data_seed, b.data_seed);
  EXPECT_NE(a.data_seed, c.data_seed);
  EXPECT_GE(a.n_tokens, 500);
  EXPECT_LE(a.n_tokens, 3000);
  std::string name;
  uint64_t gen = 0;
  ASSERT_TRUE(ParseModel(a.Model(), &name, &gen));
  EXPECT_EQ(name, "ctx-01");
  EXPECT_EQ(gen, 7u);
  EXPECT_FALSE(ParseModel("sqz-stress name=x gen=", &name, &gen));
  EXPECT_FALSE(ParseModel("llama", &name, &gen));
}

class StressCheck : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(DB::Open(Options(), dir_.Sub("db"), &db_).ok()); }
  Status Check(const std::string& name, const std::set<uint64_t>& allowed, uint64_t* gen) {
    std::unique_ptr<ContextHandle> h;
    SQZ_RETURN_IF_ERROR(ContextHandle::Open(db_.get(), name, &h));
    CheckCounters c;
    return CheckHandle(*h, name, allowed, &cache_, &ids_, 1, &c, gen);
  }
  ScopedTempDir dir_{"sqz-stress-check"};
  std::unique_ptr<DB> db_;
  ReferenceCache cache_;
  IdRegistry ids_;
};

TEST_F(StressCheck, AcceptsTheVersionAndEverySparseConfiguration) {
  uint64_t g = 1;
  while (!SpecOf("a", g).calibrated) ++g;  // threshold mode too
  ASSERT_TRUE(BuildVersion(db_.get(), SpecOf("a", g), false).ok());
  std::unique_ptr<ContextHandle> h;
  ASSERT_TRUE(ContextHandle::Open(db_.get(), "a", &h).ok());
  for (uint64_t seed = 0; seed < 24; ++seed) {  // dense, budget, threshold, flat, hierarchical, ...
    CheckCounters c;
    uint64_t gen = 0;
    Status s = CheckHandle(*h, "a", {0, g}, &cache_, &ids_, seed, &c, &gen);
    ASSERT_TRUE(s.ok()) << "seed " << seed << ": " << s.ToString();
    EXPECT_EQ(gen, g);
    EXPECT_EQ(c.rows, kLayers * kKvHeads * SpecOf("a", g).n_tokens);
  }
}

TEST_F(StressCheck, RefusesAVersionTheOracleDoesNotAllow) {
  ASSERT_TRUE(BuildVersion(db_.get(), SpecOf("a", 3), false).ok());
  uint64_t gen = 0;
  Status s = Check("a", {0, 2}, &gen);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.ToString().find("serves gen 3"), std::string::npos) << s.ToString();
}

TEST_F(StressCheck, RefusesAnotherVersionsRows) {
  // Model, shapes and options of gen 3, the keys and values of other data.
  VersionSpec wrong = SpecOf("a", 3);
  wrong.data_seed ^= 1;
  ASSERT_TRUE(BuildVersion(db_.get(), wrong, false).ok());
  uint64_t gen = 0;
  Status s = Check("a", {3}, &gen);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.ToString().find("rows differ"), std::string::npos) << s.ToString();
}

TEST_F(StressCheck, RefusesAReusedId) {
  ASSERT_TRUE(ids_.See(5, "a", 1).ok());
  ASSERT_TRUE(ids_.See(5, "a", 1).ok());
  EXPECT_TRUE(ids_.See(5, "b", 1).IsCorruption());
  EXPECT_TRUE(ids_.See(5, "a", 2).IsCorruption());
}

TEST_F(StressCheck, DatabaseAgainstTheOracle) {
  ASSERT_TRUE(BuildVersion(db_.get(), SpecOf("a", 1), false).ok());
  ASSERT_TRUE(BuildVersion(db_.get(), SpecOf("b", 2), false).ok());
  const std::string path = dir_.Sub("oracle.log");
  Counters counters;
  VerifySummary summary;
  {
    LogWriter log;
    ASSERT_TRUE(log.Open(path).ok());
    for (const Record& r : {Rec('P', 1, "a"), Rec('p', 1, "a"), Rec('P', 2, "b"), Rec('P', 3, "c")}) {
      ASSERT_TRUE(log.Append(r).ok());
    }
    // b and c in flight: b resolves to gen 2, c (never built) to absent.
    Status s = VerifyDatabase(db_.get(), &log, &cache_, &ids_, /*full=*/true, 1, &counters, &summary);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(summary.contexts, 2);
    EXPECT_EQ(summary.resolved, 2);
    EXPECT_EQ(log.Get("b").committed, 2u);
    EXPECT_EQ(log.Get("c").committed, 0u);
    EXPECT_GT(summary.live_bytes, 0u);
  }
  // A context the oracle says exists is gone.
  ASSERT_TRUE(db_->DropContext("a").ok());
  {
    LogWriter log;
    ASSERT_TRUE(log.Open(path).ok());
    Status s = VerifyDatabase(db_.get(), &log, &cache_, &ids_, true, 1, &counters, &summary);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.ToString().find("'a' is missing"), std::string::npos) << s.ToString();
  }
  // A context the oracle never built.
  ASSERT_TRUE(BuildVersion(db_.get(), SpecOf("a", 1), false).ok());
  ASSERT_TRUE(BuildVersion(db_.get(), SpecOf("z", 9), false).ok());
  {
    LogWriter log;
    ASSERT_TRUE(log.Open(path).ok());
    Status s = VerifyDatabase(db_.get(), &log, &cache_, &ids_, true, 1, &counters, &summary);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.ToString().find("'z', which the oracle never built"), std::string::npos) << s.ToString();
  }
}

}  // namespace
}  // namespace sqz::stress
