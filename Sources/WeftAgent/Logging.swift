import Foundation
import Logging

/// Log lines go to stderr, one per line, with a timestamp and level.
public enum WeftLogging {
    private static let once: Void = {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = ProcessInfo.processInfo.environment["WEFT_LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? .info
            return handler
        }
    }()

    public static func logger(_ label: String) -> Logger {
        _ = once
        return Logger(label: label)
    }
}
