// Status and the small type helpers of include/sqz/types.h.

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "sqz/status.h"
#include "sqz/types.h"

namespace sqz {
namespace {

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kOk);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(Status::OK().ok());
  EXPECT_FALSE(s.IsNotFound());
  EXPECT_FALSE(s.IsCorruption());
}

TEST(StatusTest, FactoriesSetCodeAndMessage) {
  struct Case {
    Status s;
    Status::Code code;
    const char* name;
    bool (Status::*is)() const;
  };
  std::vector<Case> cases;
  cases.push_back({Status::NotFound("m"), Status::Code::kNotFound, "NotFound", &Status::IsNotFound});
  cases.push_back({Status::Corruption("m"), Status::Code::kCorruption, "Corruption", &Status::IsCorruption});
  cases.push_back(
      {Status::InvalidArgument("m"), Status::Code::kInvalidArgument, "InvalidArgument", &Status::IsInvalidArgument});
  cases.push_back({Status::IOError("m"), Status::Code::kIOError, "IOError", &Status::IsIOError});
  cases.push_back(
      {Status::AlreadyExists("m"), Status::Code::kAlreadyExists, "AlreadyExists", &Status::IsAlreadyExists});
  cases.push_back({Status::NotSupported("m"), Status::Code::kNotSupported, "NotSupported", &Status::IsNotSupported});
  cases.push_back({Status::Aborted("m"), Status::Code::kAborted, "Aborted", &Status::IsAborted});
  for (const Case& c : cases) {
    EXPECT_FALSE(c.s.ok()) << c.name;
    EXPECT_EQ(c.s.code(), c.code) << c.name;
    EXPECT_EQ(c.s.message(), "m");
    EXPECT_EQ(c.s.ToString(), std::string(c.name) + ": m");
    EXPECT_STREQ(StatusCodeName(c.code), c.name);
    // Exactly one predicate is true.
    for (const Case& other : cases) EXPECT_EQ((c.s.*(other.is))(), c.code == other.code) << c.name;
  }
  EXPECT_STREQ(StatusCodeName(Status::Code::kOk), "OK");
  // Persisted values never change.
  EXPECT_EQ(static_cast<int>(Status::Code::kNotFound), 1);
  EXPECT_EQ(static_cast<int>(Status::Code::kAborted), 7);
}

TEST(StatusTest, EmptyErrorMessageIsStillAnError) {
  Status s = Status::IOError("");
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.IsIOError());
  EXPECT_EQ(s.message(), "");
}

TEST(StatusTest, CopyIsDeepAndMoveTransfers) {
  Status a = Status::Corruption("bad block 7");
  Status b(a);
  EXPECT_EQ(b.ToString(), a.ToString());
  Status c;
  c = a;
  a = Status::OK();  // the copies own their state
  EXPECT_TRUE(a.ok());
  EXPECT_EQ(b.ToString(), "Corruption: bad block 7");
  EXPECT_EQ(c.ToString(), "Corruption: bad block 7");
  const Status& alias = c;
  c = alias;  // self-assignment keeps the state
  EXPECT_EQ(c.ToString(), "Corruption: bad block 7");
  c = Status::OK();
  EXPECT_TRUE(c.ok());

  Status d(std::move(b));
  EXPECT_TRUE(d.IsCorruption());
  EXPECT_EQ(d.message(), "bad block 7");
  Status e;
  e = std::move(d);
  EXPECT_EQ(e.message(), "bad block 7");
  // Copying an OK status yields OK.
  Status f(a);
  EXPECT_TRUE(f.ok());
}

TEST(StatusTest, WithPrefix) {
  Status s = Status::NotFound("context 12").WithPrefix("open /db");
  EXPECT_TRUE(s.IsNotFound());
  EXPECT_EQ(s.message(), "open /db: context 12");
  EXPECT_EQ(s.ToString(), "NotFound: open /db: context 12");
  EXPECT_TRUE(Status::OK().WithPrefix("anything").ok());
  EXPECT_EQ(Status::OK().WithPrefix("anything").message(), "");
}

Status Fails() { return Status::Aborted("stop"); }
Status Passes() { return Status::OK(); }
Status Chain(bool fail, int* reached) {
  SQZ_RETURN_IF_ERROR(Passes());
  *reached = 1;
  if (fail) SQZ_RETURN_IF_ERROR(Fails());
  *reached = 2;
  return Status::OK();
}

TEST(StatusTest, ReturnIfError) {
  int reached = 0;
  EXPECT_TRUE(Chain(false, &reached).ok());
  EXPECT_EQ(reached, 2);
  reached = 0;
  Status s = Chain(true, &reached);
  EXPECT_TRUE(s.IsAborted());
  EXPECT_EQ(s.message(), "stop");
  EXPECT_EQ(reached, 1);
}

TEST(TypesTest, DTypes) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  // On-disk values.
  EXPECT_EQ(static_cast<int>(DType::kF32), 0);
  EXPECT_EQ(static_cast<int>(DType::kF16), 1);
  EXPECT_EQ(static_cast<int>(DType::kBF16), 2);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    DType back = t == DType::kF32 ? DType::kF16 : DType::kF32;
    ASSERT_TRUE(ParseDType(DTypeName(t), &back)) << DTypeName(t);
    EXPECT_EQ(back, t);
  }
  EXPECT_STREQ(DTypeName(DType::kBF16), "BF16");
  DType out = DType::kF16;
  for (const char* bad : {"", "f16", "F64", "I32", "BF16 ", "FP16", "F1"}) {
    EXPECT_FALSE(ParseDType(bad, &out)) << bad;
  }
  EXPECT_EQ(out, DType::kF16) << "a failed parse must not touch *out";
}

TEST(TypesTest, ShapesAndViews) {
  EXPECT_EQ(ShapeToString({}), "[]");
  EXPECT_EQ(ShapeToString({5}), "[5]");
  EXPECT_EQ(ShapeToString({8, 131072, 128}), "[8, 131072, 128]");
  TensorView v;
  v.dtype = DType::kF16;
  v.shape = {2, 3, 4};
  EXPECT_EQ(v.numel(), 24);
  EXPECT_EQ(v.nbytes(), 48u);
  v.shape = {};
  EXPECT_EQ(v.numel(), 1);  // a scalar
  v.shape = {3, 0};
  EXPECT_EQ(v.numel(), 0);
}

}  // namespace
}  // namespace sqz
