// Fault injection across the layers: a build whose writes start failing
// part-way (as on a full disk) must return a clear IOError, leave no partial
// context visible, and leave the database openable with earlier contexts
// intact. The write failure is produced for real by RLIMIT_FSIZE in a separate
// sqctl process (writes past the limit fail with EFBIG once SIGXFSZ is ignored).
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "synth/synthetic.h"
#include "tests/test_util.h"

namespace sqz {
namespace {

using sqz::testing::ScopedTempDir;

synth::Spec SmallSpec(int64_t tokens, int layers) {
  synth::Spec spec;
  spec.n_layers = layers;
  spec.n_kv_heads = 2;
  spec.n_q_heads = 4;
  spec.n_tokens = tokens;
  spec.head_dim = 64;
  spec.q_window = 32;
  spec.n_queries = 4;
  return spec;
}

Status Build(DB* db, const std::string& name, const std::string& kv_path) {
  std::unique_ptr<KvSource> src;
  SQZ_RETURN_IF_ERROR(OpenSafetensorsKvSource(kv_path, &src));
  BuildOptions o;
  o.kmeans_iters = 2;
  return BuildContext(db, name, src.get(), o);
}

TEST(FaultInjection, WriteFailureMidBuildLeavesDatabaseConsistent) {
  ScopedTempDir dir;
  const std::string small = dir.Sub("small.safetensors"), big = dir.Sub("big.safetensors");
  ASSERT_TRUE(synth::WriteContextFiles(SmallSpec(1024, 1), small, "").ok());
  ASSERT_TRUE(synth::WriteContextFiles(SmallSpec(8192, 4), big, "").ok());  // 8 MiB of KV
  {
    std::unique_ptr<DB> db;
    ASSERT_TRUE(DB::Open(Options(), dir.Sub("db"), &db).ok());
    ASSERT_TRUE(Build(db.get(), "kept", small).ok());
  }

  // The failing build runs as a separate sqctl process (forking this test
  // process after it used OpenMP would not be safe). `ulimit -f` caps file
  // size; SIGXFSZ is ignored so writes fail with EFBIG instead.
  std::string out;
  int rc =
      sqz::testing::RunCommand("bash -c 'ulimit -f 2048; trap \"\" XFSZ; exec " + sqz::testing::SqctlPath() +
                                   " build-index --db " + dir.Sub("db") + " --kv " + big + " --name big --iters 2'",
                               &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("IOError"), std::string::npos) << out;
  EXPECT_NE(out.find("'big'"), std::string::npos) << out;

  // Without the limit the database opens, the earlier context is intact and
  // nothing of the failed build is visible.
  std::unique_ptr<DB> db;
  Status s = DB::Open(Options(), dir.Sub("db"), &db);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<std::string> names;
  ASSERT_TRUE(db->ListContexts(&names).ok());
  EXPECT_EQ(names, std::vector<std::string>{"kept"});
  s = db->VerifyContext("kept", nullptr);
  EXPECT_TRUE(s.ok()) << s.ToString();
  // And the database still accepts the build once there is room.
  s = Build(db.get(), "big", big);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(db->VerifyContext("big", nullptr).ok());
}

}  // namespace
}  // namespace sqz
