import Foundation
import WeftProto

/// A live hub, as registered in etcd under its lease (SPEC.md §12.2).
public struct HubRecord: Codable, Sendable, Equatable {
    public var name: String
    public var id: UInt16
    /// `HOST:PORT` where the hub's weftd listens, as reached from its own region.
    public var address: String
    public var startedNs: Int64
    /// Names of the volumes the hub has open as their home (nil: none yet).
    public var serving: [String]?

    public init(name: String, id: UInt16, address: String, startedNs: Int64, serving: [String]? = nil) {
        self.name = name
        self.id = id
        self.address = address
        self.startedNs = startedNs
        self.serving = serving
    }
}

/// A volume of the cluster.
public struct VolumeRecord: Codable, Sendable, Equatable {
    public var name: String
    public var id: UInt16
    /// Name of the home hub: the single metadata authority of the volume.
    public var home: String
    /// Bumped by every change of home.
    public var epoch: UInt64
    public var chunkSizeBytes: UInt32
    public var compression: String
    public var createdNs: Int64

    public init(name: String, id: UInt16, home: String, epoch: UInt64, chunkSizeBytes: UInt32, compression: String,
                createdNs: Int64) {
        self.name = name
        self.id = id
        self.home = home
        self.epoch = epoch
        self.chunkSizeBytes = chunkSizeBytes
        self.compression = compression
        self.createdNs = createdNs
    }
}

/// Everything a hub or agent knows of the cluster, at one etcd revision.
public struct ClusterMap: Codable, Sendable, Equatable {
    public var cluster: String
    public var revision: Int64
    /// Live hubs by name.
    public var hubs: [String: HubRecord]
    /// Every hub id ever given, by hub name (also for hubs that are down now).
    public var hubIDs: [String: UInt16]
    public var volumes: [String: VolumeRecord]
    /// routes[from][to] = address to use from region `from` to reach hub `to`.
    public var routes: [String: [String: String]]
    /// The hub that sent this map (set in `clusterMap` answers): the region of whoever asked.
    public var answeredBy: String?

    public init(cluster: String) {
        self.cluster = cluster
        revision = 0
        hubs = [:]
        hubIDs = [:]
        volumes = [:]
        routes = [:]
    }

    /// The address a process in region `from` uses to reach hub `to`, nil if `to` is not live.
    public func address(of hub: String, from region: String) -> String? {
        if let routed = routes[region]?[hub] { return routed }
        return hubs[hub]?.address
    }

    public func volume(id: UInt16) -> VolumeRecord? {
        volumes.values.first { $0.id == id }
    }

    public func hubName(id: UInt16) -> String? {
        hubIDs.first { $0.value == id }?.key
    }

    /// Decodes the JSON a hub answers `clusterMap` with; EIO names `hub` if it is unreadable.
    public static func decode(_ json: [UInt8], from hub: String) throws -> ClusterMap {
        do {
            return try JSONDecoder().decode(ClusterMap.self, from: Data(json))
        } catch {
            throw WeftError(EIO, "hub \(hub) sent an unreadable cluster map: \(error)")
        }
    }
}

/// The etcd key layout under `/weft/<cluster>/` (SPEC.md §12.2).
public struct ClusterKeys: Sendable {
    public let root: String

    public init(cluster: String) {
        root = "/weft/\(cluster)/"
    }

    public var hubsPrefix: String { root + "hubs/" }
    public var hubIDsPrefix: String { root + "hub-ids/" }
    public var volumesPrefix: String { root + "volumes/" }
    public var routesPrefix: String { root + "routes/" }
    public var hubIDCounter: String { root + "counters/hub-id" }
    public var volumeIDCounter: String { root + "counters/volume-id" }

    public func hub(_ name: String) -> String { hubsPrefix + name }
    public func hubID(_ name: String) -> String { hubIDsPrefix + name }
    public func volume(_ name: String) -> String { volumesPrefix + name }
    public func route(from: String, to: String) -> String { routesPrefix + from + "/" + to }

    /// Applies one key's value (nil: deleted) to `map`. Keys outside the layout are ignored.
    public func apply(key: String, value: Data?, to map: inout ClusterMap) {
        let decoder = JSONDecoder()
        if key.hasPrefix(hubsPrefix) {
            let name = String(key.dropFirst(hubsPrefix.count))
            map.hubs[name] = value.flatMap { try? decoder.decode(HubRecord.self, from: $0) }
        } else if key.hasPrefix(hubIDsPrefix) {
            let name = String(key.dropFirst(hubIDsPrefix.count))
            map.hubIDs[name] = value.flatMap { try? decoder.decode(IDRecord.self, from: $0) }?.id
        } else if key.hasPrefix(volumesPrefix) {
            let name = String(key.dropFirst(volumesPrefix.count))
            map.volumes[name] = value.flatMap { try? decoder.decode(VolumeRecord.self, from: $0) }
        } else if key.hasPrefix(routesPrefix) {
            let parts = key.dropFirst(routesPrefix.count).split(separator: "/", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { return }
            let address = value.flatMap { try? decoder.decode(RouteRecord.self, from: $0) }?.address
            map.routes[parts[0], default: [:]][parts[1]] = address
            if map.routes[parts[0]]?.isEmpty == true { map.routes[parts[0]] = nil }
        }
    }
}

/// Value of `hub-ids/<name>`.
public struct IDRecord: Codable, Sendable {
    public var id: UInt16
    public init(id: UInt16) { self.id = id }
}

/// Value of `routes/<from>/<to>`.
public struct RouteRecord: Codable, Sendable {
    public var address: String
    public init(address: String) { self.address = address }
}

/// Names of hubs and volumes.
public enum ClusterNames {
    /// Hub names: 1–32 of `a-z`, `0-9`, `-`.
    public static func validateHub(_ name: String) throws {
        guard (1...32).contains(name.utf8.count),
              name.utf8.allSatisfy({ (0x61...0x7A).contains($0) || (0x30...0x39).contains($0) || $0 == 0x2D }) else {
            throw WeftError(EINVAL, "hub name '\(name)' must be 1-32 characters of a-z, 0-9 and -")
        }
    }

    /// Volume names are path components of the global root: 1–255 bytes, no '/', no NUL, not . or ..
    public static func validateVolume(_ name: String) throws {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty else { throw WeftError(EINVAL, "a volume name cannot be empty") }
        guard bytes.count <= 255 else { throw WeftError(ENAMETOOLONG, "volume name longer than 255 bytes") }
        guard !bytes.contains(0x2F), !bytes.contains(0), name != ".", name != ".." else {
            throw WeftError(EINVAL, "volume name '\(name)' must be a path component (no '/', not . or ..)")
        }
    }
}
