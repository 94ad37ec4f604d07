// sqctl backup, restore, repair.
#include <cstdio>
#include <string>
#include <vector>

#include "cli.h"
#include "format.h"
#include "sqz/db.h"

namespace sqz::cli {
namespace {

int RunBackup(const Args& args) {
  const std::string cmd = "backup", to = args.Get("to");
  std::unique_ptr<DB> db;
  Status s = OpenDatabase(args.Get("db"), OpenMode::kReadWrite, &db);
  if (!s.ok()) return Fail(cmd, s);
  BackupInfo info;
  s = db->Backup(to, &info);
  if (!s.ok()) return Fail(cmd, s);
  if (args.Has("json")) {
    Json j;
    j["backup_dir"] = to;
    j["backup_id"] = info.backup_id;
    j["contexts"] = info.contexts;
    j["bytes"] = info.bytes;
    std::printf("%s\n", JsonDump(j).c_str());
  } else {
    std::printf("backup %u of %s in %s: %zu context(s), %s, every file verified\n", info.backup_id,
                args.Get("db").c_str(), to.c_str(), info.contexts.size(), FormatBytes(info.bytes).c_str());
  }
  return 0;
}

int RunRestore(const Args& args) {
  const std::string cmd = "restore", from = args.Get("from"), db = args.Get("db");
  int64_t id = 0;
  Status s = args.GetInt("backup-id", int64_t{0}, 0, 0xffffffffll, &id);
  if (!s.ok()) return Usage(cmd, s.message());
  BackupInfo info;
  s = DB::Restore(from, static_cast<uint32_t>(id), db, &info);
  if (!s.ok()) return Fail(cmd, s);
  if (args.Has("json")) {
    Json j;
    j["db"] = db;
    j["backup_id"] = info.backup_id;
    j["contexts"] = info.contexts;
    std::printf("%s\n", JsonDump(j).c_str());
  } else {
    std::printf("restored backup %u of %s into %s: %zu context(s), every one verified\n", info.backup_id, from.c_str(),
                db.c_str(), info.contexts.size());
  }
  return 0;
}

int RunRepair(const Args& args) {
  const std::string cmd = "repair", damaged = args.Get("db"), out = args.Get("out");
  RepairReport r;
  Status s = DB::Repair(damaged, out, &r);
  if (!s.ok()) return Fail(cmd, s);
  if (args.Has("json")) {
    Json j;
    j["db"] = damaged;
    j["out"] = out;
    j["recovered"] = r.recovered;
    Json lost = Json::array();
    for (const auto& [name, why] : r.lost) {
      Json l;
      l["name"] = name;
      l["reason"] = why;
      lost.push_back(std::move(l));
    }
    j["lost"] = std::move(lost);
    j["unnamed_ids"] = r.unnamed_ids;
    j["damaged_files"] = r.damaged_files;
    j["logs_skipped"] = r.logs_skipped;
    std::printf("%s\n", JsonDump(j).c_str());
  } else {
    std::printf("repaired copy of %s written to %s (%s itself was not changed)\n", damaged.c_str(), out.c_str(),
                damaged.c_str());
    for (const auto& n : r.recovered) std::printf("recovered  %s\n", PrintableName(n).c_str());
    for (const auto& [n, why] : r.lost) std::printf("LOST       %s: %s\n", PrintableName(n).c_str(), why.c_str());
    for (uint64_t id : r.unnamed_ids) {
      std::printf("LOST       context id %llu: records without any readable manifest (name unknown)\n",
                  static_cast<unsigned long long>(id));
    }
    for (const auto& f : r.damaged_files) std::printf("damaged file set aside: %s/lost/%s\n", out.c_str(), f.c_str());
    if (r.logs_skipped) {
      std::printf("the write-ahead log could not be replayed: writes since the last flush are not in the copy\n");
    }
  }
  if (!r.lost.empty() || !r.unnamed_ids.empty()) {
    std::fprintf(stderr,
                 "sqctl repair: %zu context(s) could not be recovered (listed above); the %zu others are in %s\n",
                 r.lost.size() + r.unnamed_ids.size(), r.recovered.size(), out.c_str());
    return 1;
  }
  return 0;
}

Registrar backup({"backup",
                  "consistent, verified copy of a database into a backup directory (readers keep running)",
                  "sqctl backup --db DIR --to BACKUP_DIR [--json]",
                  {{"db", "DIR", "database directory", true},
                   {"to", "BACKUP_DIR",
                    "backup directory: new, empty, or one made by sqctl backup (backups share unchanged files)", true},
                   {"json", "", "JSON output"}},
                  RunBackup});
Registrar restore({"restore",
                   "restore a backup into a new database directory and verify every context",
                   "sqctl restore --from BACKUP_DIR --db NEW_DIR [--backup-id N] [--json]",
                   {{"from", "BACKUP_DIR", "backup directory (sqctl backup)", true},
                    {"db", "NEW_DIR", "where to restore: a new or empty directory", true},
                    {"backup-id", "N", "which backup (default: the latest)"},
                    {"json", "", "JSON output"}},
                   RunRestore});
Registrar repair({"repair",
                  "salvage a damaged database into a new directory; reports every context lost (exit 1 if any)",
                  "sqctl repair --db DIR --out NEW_DIR [--json]",
                  {{"db", "DIR", "the damaged database (only read)", true},
                   {"out", "NEW_DIR", "where to write the repaired copy: a new or empty directory", true},
                   {"json", "", "JSON output"}},
                  RunRepair});

}  // namespace
}  // namespace sqz::cli
