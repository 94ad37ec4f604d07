// What is in a database directory before RocksDB is let near it (private to
// storage/). RocksDB creates a database over anything that lacks a CURRENT
// file and deletes the table files its MANIFEST does not name, so squeeze
// decides first: it creates a database only in a new or empty directory, and
// opens one only where CURRENT and squeeze's identity file (or a squeeze
// layout, for databases made before the file existed) are present.
#pragma once

#include <string>
#include <vector>

#include "sqz/status.h"

namespace sqz::storage {

// Written at creation, first; part of the format (docs/FORMAT.md).
inline constexpr const char* kIdentityFile = "SQUEEZE";

enum class DirState {
  kAbsent,    // nothing at the path
  kEmpty,     // an empty directory (or one left by a creation killed before RocksDB wrote anything)
  kDatabase,  // CURRENT is present: a database to open (its layout is checked at open)
};

// Classifies `path`. Errors, with nothing changed: not a directory
// (InvalidArgument); a squeeze or RocksDB database whose CURRENT is missing
// (Corruption naming sqctl repair); a directory of other files
// (InvalidArgument naming one of them).
Status InspectDatabaseDir(const std::string& path, DirState* state);

// True for the names RocksDB gives its files (CURRENT, MANIFEST-*, *.sst, ...).
bool IsRocksFileName(const std::string& name);

// Writes the identity file into `dir` (atomically, synced).
Status WriteIdentityFile(const std::string& dir);
bool HasIdentityFile(const std::string& dir);

// Names of the entries of `dir` (no "." / ".."), sorted.
Status ListDir(const std::string& dir, std::vector<std::string>* names);

}  // namespace sqz::storage
