// Writes the seed corpora of the fuzz targets into CORPUS_DIR/<target>/
// (fuzz/make_seeds.sh runs it; the files are checked in as fuzz/corpus/).
// Valid inputs come from the project's own writers: the synthetic-corpus
// generator's KV and queries files (SafetensorsWriter), and the records of a
// context built from one of them by BuildContext into a scratch database,
// read back and re-encoded (EncodeManifest, EncodeHeadIndex). A few
// hand-written files add what the writers never produce (escapes, other
// dtypes, zero-sized tensors). Deterministic: the same files every run.
//
//   fuzz_seed_writer CORPUS_DIR
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fuzz_common.h"
#include "query/eval.h"
#include "records.h"
#include "sqz/build.h"
#include "sqz/db.h"
#include "sqz/kv_source.h"
#include "synth/synthetic.h"

namespace sqz::fuzz {
namespace {

namespace fs = std::filesystem;

Status WriteBytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return Status::IOError(path.string() + ": write failed");
  return Status::OK();
}

Status ReadBytes(const fs::path& path, std::string* bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path.string() + ": cannot open");
  bytes->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return Status::OK();
}

const uint8_t* Bytes(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

// A safetensors file from a header written by hand and its data section.
std::string RawSafetensors(const std::string& header, const std::string& data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  return out + header + data;
}

// A context of the synthetic generator, small enough for a seed.
synth::Spec TinySpec(int n_layers, int n_kv_heads, int n_q_heads, int64_t n_tokens, int head_dim, DType dtype,
                     int q_window) {
  synth::Spec s;
  s.n_layers = n_layers;
  s.n_kv_heads = n_kv_heads;
  s.n_q_heads = n_q_heads;
  s.n_tokens = n_tokens;
  s.head_dim = head_dim;
  s.dtype = dtype;
  s.q_window = q_window;
  s.n_queries = 2;
  s.n_topics = 3;
  return s;
}

class SeedWriter {
 public:
  SeedWriter(fs::path corpus, fs::path scratch) : corpus_(std::move(corpus)), scratch_(std::move(scratch)) {}

  Status Run() {
    for (const char* t : {"fuzz_safetensors", "fuzz_records", "fuzz_queries"}) fs::create_directories(corpus_ / t);
    fs::create_directories(scratch_);
    // Synthetic contexts: KV files for fuzz_safetensors, queries files for
    // fuzz_queries, and each one built for fuzz_records: calibrated; 6
    // tokens, all of them window and sinks (no clustered key, no cluster,
    // an empty histogram); no window queries (uncalibrated).
    SQZ_RETURN_IF_ERROR(Synthetic("f16", TinySpec(2, 2, 4, 32, 8, DType::kF16, 4)));
    SQZ_RETURN_IF_ERROR(Synthetic("bf16", TinySpec(1, 1, 2, 6, 2, DType::kBF16, 1)));
    SQZ_RETURN_IF_ERROR(Synthetic("f32", TinySpec(1, 2, 2, 20, 4, DType::kF32, 0)));
    SQZ_RETURN_IF_ERROR(HandWritten());
    return Status::OK();
  }

 private:
  Status Put(const char* target, const std::string& name, const std::string& bytes) {
    return WriteBytes(corpus_ / target / name, bytes);
  }

  // Hand-written files that must be valid are checked by the reader.
  Status CheckKv(const std::string& bytes) {
    const fs::path path = scratch_ / "check.safetensors";
    SQZ_RETURN_IF_ERROR(WriteBytes(path, bytes));
    std::unique_ptr<KvSource> src;
    return OpenSafetensorsKvSource(path.string(), &src);
  }
  Status CheckQueries(const std::string& prefix, const std::string& bytes) {
    const fs::path path = scratch_ / "check.safetensors";
    SQZ_RETURN_IF_ERROR(WriteBytes(path, bytes));
    std::vector<query::LayerQueries> queries;
    return query::ReadQueriesFile(path.string(), QueriesContext(Bytes(prefix)), &queries);
  }

  Status Synthetic(const std::string& tag, const synth::Spec& spec) {
    const fs::path kv = scratch_ / ("kv_" + tag + ".safetensors");
    const fs::path q = scratch_ / ("q_" + tag + ".safetensors");
    SQZ_RETURN_IF_ERROR(synth::WriteContextFiles(spec, kv.string(), q.string()));
    std::string bytes, prefix;
    SQZ_RETURN_IF_ERROR(ReadBytes(kv, &bytes));
    SQZ_RETURN_IF_ERROR(Put("fuzz_safetensors", "synth_kv_" + tag, bytes));
    SQZ_RETURN_IF_ERROR(ReadBytes(q, &bytes));
    ContextInfo shapes;
    shapes.n_layers = spec.n_layers;
    shapes.n_kv_heads = spec.n_kv_heads;
    shapes.n_q_heads = spec.n_q_heads;
    shapes.head_dim = spec.head_dim;
    if (!QueriesPrefix(shapes, &prefix)) return Status::InvalidArgument(tag + ": shapes outside the queries prefix");
    // The valid seeds must reach the readers' success paths.
    std::vector<query::LayerQueries> queries;
    SQZ_RETURN_IF_ERROR(query::ReadQueriesFile(q.string(), QueriesContext(Bytes(prefix)), &queries));
    std::unique_ptr<KvSource> src;
    SQZ_RETURN_IF_ERROR(OpenSafetensorsKvSource(kv.string(), &src));
    SQZ_RETURN_IF_ERROR(Put("fuzz_queries", "synth_queries_" + tag, prefix + bytes));
    SQZ_RETURN_IF_ERROR(Put("fuzz_safetensors", "synth_queries_" + tag, bytes));
    return Build(tag, kv);
  }

  // Builds the context into a scratch database and writes its records as
  // fuzz_records inputs: the manifest, and every head index behind the
  // prefix that gives its context.
  Status Build(const std::string& tag, const fs::path& kv) {
    std::unique_ptr<DB> db;
    SQZ_RETURN_IF_ERROR(DB::Open(Options(), (scratch_ / ("db_" + tag)).string(), &db));
    std::unique_ptr<KvSource> src;
    SQZ_RETURN_IF_ERROR(OpenSafetensorsKvSource(kv.string(), &src));
    BuildOptions o;
    o.window = 4;
    o.n_sinks = 2;
    o.page_rows = 8;
    o.fine_ratio = 0.25;
    o.coarse_ratio = 0.1;
    o.kmeans_iters = 4;
    o.quantiles = {0.5, 0.9};
    o.read_ahead = false;
    SQZ_RETURN_IF_ERROR(BuildContext(db.get(), "seed", src.get(), o));
    std::unique_ptr<storage::ContextSnapshot> snap;
    SQZ_RETURN_IF_ERROR(db->store()->OpenSnapshot("seed", &snap));
    ContextInfo info = snap->info();
    info.build_seconds = 0;  // the same bytes every run
    info.created_unix = 0;
    info.bytes_on_disk = 0;
    const std::string manifest = storage::EncodeManifest(info);
    ContextInfo manifest_back;
    SQZ_RETURN_IF_ERROR(storage::DecodeManifest(manifest, "seed", &manifest_back));
    SQZ_RETURN_IF_ERROR(Put("fuzz_records", "manifest_" + tag, std::string(1, '\0') + manifest));
    for (int l = 0; l < info.n_layers; ++l) {
      for (int h = 0; h < info.n_kv_heads; ++h) {
        storage::HeadIndexRecord rec;
        SQZ_RETURN_IF_ERROR(snap->GetHeadIndex(l, h, &rec));
        HeadIndexCall c;
        c.info = info;
        c.layer = l;
        c.head = h;
        c.full = (l + h) % 2 == 0;
        std::string prefix;
        if (!HeadIndexPrefix(c, &prefix)) return Status::InvalidArgument(tag + ": shapes outside the record prefix");
        const HeadIndexCall back = HeadIndexContext(Bytes(prefix));
        const std::string record = storage::EncodeHeadIndex(info, rec);
        storage::HeadIndexRecord record_back;
        SQZ_RETURN_IF_ERROR(storage::ValidateManifest(back.info));
        SQZ_RETURN_IF_ERROR(
            storage::DecodeHeadIndex(record, back.Context(), back.layer, back.head, back.full, "seed", &record_back));
        SQZ_RETURN_IF_ERROR(Put("fuzz_records", "head_" + tag + "_" + std::to_string(l) + "_" + std::to_string(h),
                                std::string(1, '\1') + prefix + record));
      }
    }
    return Status::OK();
  }

  Status HandWritten() {
    // Safetensors files the writer never produces.
    SQZ_RETURN_IF_ERROR(Put("fuzz_safetensors", "empty", RawSafetensors("{}", "")));
    SQZ_RETURN_IF_ERROR(Put("fuzz_safetensors", "metadata_only",
                            RawSafetensors(R"({"__metadata__":{"n_q_heads":"4","model":"m"}})", "")));
    SQZ_RETURN_IF_ERROR(Put("fuzz_safetensors", "dtypes_and_zero_sizes",
                            RawSafetensors(R"({"z":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]},)"
                                           R"("i":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},)"
                                           R"("s":{"dtype":"BF16","shape":[],"data_offsets":[8,10]},)"
                                           R"("u":{"dtype":"F8_E4M3","shape":[1,2],"data_offsets":[10,12]},)"
                                           R"("x":{"dtype":"X","shape":[5],"data_offsets":[12,13]}})",
                                           std::string(13, '\x3c'))));
    // A one-layer KV file in hand-written JSON: whitespace, escapes, keys in
    // another order, an unknown field.
    const std::string one = std::string("\0\0\x80\x3f", 4);  // 1.0f
    const std::string kv_escapes = RawSafetensors(
        " {\n \"__metadata__\" : {\"n_q_heads\":\"1\", \"model\":\"a\\u00e9\\n\\\"b\\\\\"},\n"
        "\t\"layers.0.v\":{\"shape\":[1,1,1],\"data_offsets\":[4,8],\"dtype\":\"F32\"},\r\n"
        " \"layers.0.k\":{\"dtype\":\"F32\",\"extra\":[null,true,false,{},-1.5e3],"
        "\"shape\":[1,1,1],\"data_offsets\":[0,4]}}",
        one + one);
    SQZ_RETURN_IF_ERROR(CheckKv(kv_escapes));
    SQZ_RETURN_IF_ERROR(Put("fuzz_safetensors", "kv_escapes", kv_escapes));
    // Queries files: the smallest valid one, and one beside tensors that are
    // not queries (layers.0.attn.q, a k).
    std::string prefix;
    ContextInfo shapes;
    shapes.n_layers = 2;
    shapes.n_kv_heads = 1;
    shapes.n_q_heads = 1;
    shapes.head_dim = 1;
    if (!QueriesPrefix(shapes, &prefix)) return Status::InvalidArgument("hand-written queries: bad prefix");
    const std::string one_query =
        RawSafetensors(R"({"layers.1.q":{"dtype":"F32","shape":[1,1,1],"data_offsets":[0,4]}})", one);
    const std::string among_others =
        RawSafetensors(R"({"layers.0.attn.q":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                       R"("layers.0.k":{"dtype":"I8","shape":[2],"data_offsets":[4,6]},)"
                       R"("layers.0.q":{"dtype":"F16","shape":[1,2,1],"data_offsets":[6,10]}})",
                       one + std::string("\x01\x02\x00\x3c\x00\x3c", 6));
    SQZ_RETURN_IF_ERROR(CheckQueries(prefix, one_query));
    SQZ_RETURN_IF_ERROR(CheckQueries(prefix, among_others));
    SQZ_RETURN_IF_ERROR(Put("fuzz_queries", "one_query", prefix + one_query));
    SQZ_RETURN_IF_ERROR(Put("fuzz_queries", "queries_among_others", prefix + among_others));
    return Status::OK();
  }

  fs::path corpus_;
  fs::path scratch_;
};

}  // namespace
}  // namespace sqz::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  std::error_code ec;
  char tmpl[] = "/tmp/sqz-seeds-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const sqz::Status s = sqz::fuzz::SeedWriter(argv[1], tmpl).Run();
  std::filesystem::remove_all(tmpl, ec);
  if (!s.ok()) {
    std::fprintf(stderr, "fuzz_seed_writer: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
