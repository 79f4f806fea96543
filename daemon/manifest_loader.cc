#include "daemon/manifest_loader.h"

#include <sys/stat.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "common/logging.h"
#include "deploy/artifact_store.h"

namespace kiln {
namespace fs = std::filesystem;

StatusOr<std::string> CachingHasher::operator()(const fs::path& p) {
  struct stat st {};
  // Put refuses what is not a regular file, or too large; its errors name the path.
  if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return store_.Put(p);
  Stamp stamp{st.st_size, st.st_mtim.tv_sec * 1'000'000'000LL + st.st_mtim.tv_nsec, st.st_ino};
  auto it = cache_.find(p.string());
  if (it != cache_.end() && it->second.first == stamp && store_.Has(it->second.second)) {
    return it->second.second;
  }
  ASSIGN_OR_RETURN(std::string digest, store_.Put(p));
  cache_[p.string()] = {stamp, digest};
  return digest;
}

BackgroundLoader::BackgroundLoader(boost::asio::io_context& io, std::function<ManifestSet()> load,
                                   std::function<void(ManifestSet)> apply)
    : io_(io), load_(std::move(load)), apply_(std::move(apply)), thread_([this] { Run(); }) {}

BackgroundLoader::~BackgroundLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

void BackgroundLoader::Request() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_ = true;
  }
  cv_.notify_one();
}

void BackgroundLoader::Run() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return pending_ || stopping_; });
      if (stopping_) return;
      pending_ = false;
    }
    ManifestSet set = load_();
    boost::asio::post(io_, [this, set = std::move(set)]() mutable { apply_(std::move(set)); });
  }
}

void LogManifestSet(const ManifestSet& set, std::string& last_logged) {
  std::string summary = set.dir + "|" + std::to_string(set.AllErrors().size());
  for (const ServiceSpec* s : set.Services()) {
    summary += "|" + s->name + "=" + s->tmpl.Hash() + "x" + std::to_string(s->replicas) + "," +
               std::string(StrategyName(s->update.strategy));
  }
  for (const auto& e : set.AllErrors()) summary += "|" + e.ToString();
  if (summary == last_logged) return;
  last_logged = std::move(summary);
  for (const ServiceSpec* s : set.Services()) {
    LogInfo("service loaded", {{"service", s->name},
                               {"version", s->tmpl.version},
                               {"replicas", s->replicas},
                               {"strategy", StrategyName(s->update.strategy)},
                               {"template_hash", s->tmpl.Hash()},
                               {"file", s->file}});
  }
  LogInfo("manifests loaded", {{"dir", set.dir},
                               {"services", static_cast<int64_t>(set.Services().size())},
                               {"errors", static_cast<int64_t>(set.AllErrors().size())}});
}

}  // namespace kiln
